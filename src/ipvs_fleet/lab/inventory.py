"""The running lab as a pyinfra inventory (`inventory/lab.py` is a thin wrapper).

    IPVS_FLEET_LAB_DIR=.lab/test pyinfra inventory/lab.py exec -- uname -r
"""

from __future__ import annotations

from typing import Any

from ipvs_fleet.errors import FleetError
from ipvs_fleet.lab.lab import Lab


def host_data(lab: Lab, name: str, user: str = "root") -> dict[str, Any]:
    """pyinfra host data of a lab host: its class and release, and SSH with host keys
    checked, as root or as a non-root `user` with sudo (the image's SUDO_USERS)."""
    h = lab.hosts[name]
    sudo = {"_sudo": True} if user != "root" else {}
    return {
        "ipvs_host_class": h.host_class,
        "ipvs_release": h.release,
        "ipvs_kernel_release": h.kernel_release,
        "ipvs_kernel_version": h.kernel_version,
        "ssh_hostname": "127.0.0.1",
        "ssh_port": h.port,
        "ssh_user": user,
        "ssh_key": str(lab.client_key),
        "ssh_known_hosts_file": str(lab.known_hosts),
        "ssh_strict_host_key_checking": "yes",
        "ssh_allow_agent": False,
        "ssh_look_for_keys": False,
        **sudo,
    }


def pyinfra_groups(
    lab: Lab | None = None, user: str = "root"
) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """Module-level groups for a pyinfra inventory file: group -> [(host, data)]."""
    lab = lab or Lab()
    if not lab.hosts:
        raise FleetError(f"lab {lab.dir} has no hosts (run: ipvs-fleet lab up)")
    return {
        group: [(n, host_data(lab, n, user)) for n in names]
        for group, names in lab.groups.items()
    }
