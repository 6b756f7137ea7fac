"""The embedded lab fleet: QEMU VMs with real Debian kernels (see `Lab`)."""

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
