"""The embedded lab fleet: QEMU VMs with real Debian kernels (see `Lab`)."""

from ipvs_fleet.lab.fleet import Fleet, FleetHost, load_fleet
from ipvs_fleet.lab.image import LAB_PACKAGES
from ipvs_fleet.lab.lab import (
    HostStatus,
    Lab,
    LabHost,
    RunResult,
    default_labdir,
    testinfra_hosts,
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
    "testinfra_hosts",
]
