"""The running lab as a pyinfra inventory (`inventory/lab.py` is a thin wrapper).

IPVS_FLEET_LAB_DIR=.lab/test pyinfra inventory/lab.py exec -- uname -r
"""

from __future__ import annotations

from typing import Any

from ipvs_fleet.errors import ConfigError, FleetError
from ipvs_fleet.lab.lab import Lab
from ipvs_fleet.policy import load_policy

# The lab's VMs are TCG guests sharing the controller's two cores (make test runs five of
# them beside pytest), so a probe's p99 measures CPU contention as well as the kernel: a
# converged canary measured 115.3 ms in CI against the k8s_node class's 100 ms. The lab
# raises a class's p99 budget to this, below its slow_ms, and keeps the real signal (no slow
# connect: a lost SYN costs 1 s; no failed one), as the fix text advises for a host that
# needs another budget. A class without a p99 budget keeps none; a test's host data wins.
LAB_P99_MS = 800

# The pair lab's directors (lab/fleet-pair.yml, group director_pair; keepalived.conf in
# lab/pair/director.sh): one failure domain, drained the operator's way. The drain file
# (vrrp_track_file, weight 1) at -100 drops the director below its peer, which takes the VIPs
# (no keepalived reload: the IPVS table and the sync daemon stay as they are); the hook waits
# until the VIPs left and, if they did not within DRAIN_WAIT_S, gives the priority back and
# fails the host (its modules as they were). After the activation 0 restores the priority
# (the higher one, lvs-a, takes the VIPs back: keepalived preempts).
PAIR_GROUP = "director_pair"
PAIR_VIPS = ("10.0.9.100", "10.0.10.1")
DRAIN_FILE = "/etc/keepalived/drain"
DRAIN_WAIT_S = 30


def drain_hooks(
    vips: tuple[str, ...] = PAIR_VIPS, wait_s: int = DRAIN_WAIT_S
) -> dict[str, list[str]]:
    """ipvs_pre_activate / ipvs_post_activate of a keepalived director with a drain file."""
    held = " || ".join(f"ip -o addr show | grep -q ' inet {v}/'" for v in vips)
    wait = (
        f"i=0; while {held}; do "
        f'[ $i -lt {wait_s} ] || {{ echo 0 > {DRAIN_FILE}; echo "the VIPs {" ".join(vips)} '
        f'did not leave $(hostname) within {wait_s} s of the drain" >&2; exit 1; }}; '
        "i=$((i+1)); sleep 1; done"
    )
    return {
        "ipvs_pre_activate": [f"echo -100 > {DRAIN_FILE}", wait],
        "ipvs_post_activate": [f"echo 0 > {DRAIN_FILE}"],
    }


def lab_group_data() -> dict[str, dict[str, Any]]:
    """Host data the lab gives a group's hosts (pyinfra: merged into each host's; Ansible:
    the group's vars)."""
    return {PAIR_GROUP: {"ipvs_failure_domain": PAIR_GROUP, **drain_hooks()}}


def lab_class_data() -> dict[str, dict[str, Any]]:
    """The lab's own host data per host class, from one read of the policy: the latency
    budget's p99 raised to LAB_P99_MS where the class budgets a lower one (never lowered,
    never added); {} for the other classes."""
    try:
        classes = load_policy().classes
    except ConfigError:
        return {}  # the deploy and the checks name the policy's error themselves
    out: dict[str, dict[str, Any]] = {}
    for name, body in classes.items():
        p99 = body["latency_budget"].get("p99_ms")
        raise_it = p99 is not None and p99 < LAB_P99_MS
        out[name] = {"ipvs_latency_budget": {"p99_ms": LAB_P99_MS}} if raise_it else {}
    return out


def host_data(
    lab: Lab, name: str, user: str = "root", class_data: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """pyinfra host data of a lab host: its class and release, the lab's budget
    (`class_data`, else lab_class_data()), and SSH with host keys checked, as root or as a
    non-root `user` with sudo (the image's SUDO_USERS)."""
    h = lab.hosts[name]
    class_data = lab_class_data() if class_data is None else class_data
    sudo = {"_sudo": True} if user != "root" else {}
    groups = lab_group_data()
    return {
        **class_data.get(h.host_class, {}),
        **{k: v for g in h.groups for k, v in groups.get(g, {}).items()},
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
    class_data = lab_class_data()
    return {
        group: [(n, host_data(lab, n, user, class_data)) for n in names]
        for group, names in lab.groups.items()
    }
