"""The embedded lab fleet: QEMU VMs with real Debian kernels.

    lab = Lab()            # lab dir: $IPVS_FLEET_LAB_DIR or <repo>/.lab
    lab.up()               # boot lab/fleet.yml (images cached in $IPVS_FLEET_CACHE); no-op when up
    lab.hosts              # name -> LabHost(release, kernel_release, host_class, groups, port, ...)
    lab.run("k8s-canary", "modprobe ip_vs")   # RunResult(rc, stdout, stderr); raises on rc != 0
    lab.reboot("k8s-canary")                  # back on the same kernel, SSH answering
    lab.status()           # [HostStatus(name, state running|died, ssh_ok, ...)]
    lab.down()             # stop this lab's VMs (pidfiles)

For pyinfra: `IPVS_FLEET_LAB_DIR=<lab.dir> pyinfra <lab.inventory_path> ...`; for ssh:
`ssh -F <lab.ssh_config> HOST`; for testinfra: `lab.testinfra_host(name)` or
`hosts_for_testinfra(labdir)`. Extra guest packages: extend `LAB_PACKAGES` before `up()`.
"""

from ipvs_fleet.lab.fleet import Fleet, FleetHost, load_fleet
from ipvs_fleet.lab.image import LAB_PACKAGES
from ipvs_fleet.lab.lab import (
    HostStatus,
    Lab,
    LabHost,
    RunResult,
    default_labdir,
    hosts_for_testinfra,
)

__all__ = [
    "LAB_PACKAGES",
    "Fleet",
    "FleetHost",
    "HostStatus",
    "Lab",
    "LabHost",
    "RunResult",
    "default_labdir",
    "load_fleet",
    "hosts_for_testinfra",
]
