"""pyinfra inventory read from an Ansible inventory: the one named by
$IPVS_FLEET_ANSIBLE_INVENTORY (default inventory/lab.ansible.yml).

    IPVS_FLEET_ANSIBLE_INVENTORY=inventory/prod.yml pyinfra inventory/from_ansible.py deploy.py
    IPVS_FLEET_ANSIBLE_INVENTORY=inventory/prod.yml ipvs-fleet check inventory/from_ansible.py

Groups and merged host variables come from `ansible-inventory --list`; the connection
variables are mapped to pyinfra's ssh_* data (ipvs_fleet.ansible_inventory).
"""

import os

from ipvs_fleet.ansible_inventory import ENV_VAR, LAB_INVENTORY, pyinfra_groups
from ipvs_fleet.hostkeys import strict_host_keys

globals().update(pyinfra_groups(os.environ.get(ENV_VAR) or LAB_INVENTORY))
globals().update(strict_host_keys(globals()))  # host keys strict from any directory
