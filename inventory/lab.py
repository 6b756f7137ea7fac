"""pyinfra inventory of the running lab fleet ($IPVS_FLEET_LAB_DIR, default .lab).

    pyinfra inventory/lab.py exec -- uname -r
    IPVS_FLEET_LAB_DIR=.lab/test pyinfra inventory/lab.py deploy.py

Groups: one per host class (k8s_nodes, ftp_hosts, connmark_hosts) plus the extra groups of
lab/fleet.yml (canary). Host data: ipvs_host_class, ipvs_release, ipvs_kernel_release and
pyinfra's ssh_* connection data (127.0.0.1, the VM's port, the lab key, known_hosts checked).
"""

from ipvs_fleet.hostkeys import strict_host_keys
from ipvs_fleet.lab.inventory import pyinfra_groups

globals().update(pyinfra_groups())
globals().update(strict_host_keys(globals()))  # host keys strict from any directory
