"""Filters of the ipvs_fleet.fleet collection for failure domains (a keepalived director pair):
the site playbook never takes two hosts of one domain in one batch, the VRRP backup first.

The decisions are `ipvs_fleet.rollout`'s (the pyinfra rollout's): the VIPs and roles read
from the host (`rollout.vrrp`), the split brain and no-master refusals (`rollout.domains`),
the host data check (`validation.failure_domains`).

    {{ '' | ipvs_fleet.fleet.ipvs_fleet_vrrp_command }}                     -> shell text
    {{ hostvars | ipvs_fleet.fleet.ipvs_fleet_domain_problems(hosts) }}     -> [reason, ...]
    {{ hostvars[inventory_hostname] | ipvs_fleet.fleet.ipvs_fleet_pair_batch }}
        -> ipvs_fleet_batch_free | ipvs_fleet_batch_backup | ipvs_fleet_batch_master
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

try:
    from ansible.errors import AnsibleFilterError
except ImportError:  # imported by the unit tests without Ansible's plugin loader
    AnsibleFilterError = ValueError  # type: ignore[misc,assignment]

REQUIREMENT = "ipvs-fleet"
# the registered result of the VRRP read (site.yml)
READ = "ipvs_fleet_vrrp_read"
FREE, BACKUP, MASTER = "ipvs_fleet_batch_free", "ipvs_fleet_batch_backup", "ipvs_fleet_batch_master"

try:
    from ipvs_fleet.errors import ConfigError
    from ipvs_fleet.rollout.domains import domain_problems
    from ipvs_fleet.rollout.vrrp import ROLE_COMMAND, VrrpState, vrrp_state
    from ipvs_fleet.validation import FAILURE_DOMAIN, failure_domains
except ImportError as e:  # a clear error at the first filter use, not a plugin-load traceback
    _MISSING: str | None = (
        f"the ipvs_fleet.fleet collection needs the {REQUIREMENT} Python package on the "
        f"controller, in ansible-core's Python (pip install {REQUIREMENT}): {e}"
    )
else:
    _MISSING = None


def vrrp_command(unused: Any = "") -> str:
    """The shell command that reads a host's keepalived.conf and addresses (`unused`: the
    value filtered, a filter needs one)."""
    return ROLE_COMMAND


def _domain(name: str, hostvars: Mapping[str, Any]) -> str | None:
    try:
        return failure_domains([(name, {FAILURE_DOMAIN: hostvars.get(FAILURE_DOMAIN)})]).get(name)
    except ConfigError as e:
        raise AnsibleFilterError(str(e)) from None


def _state(hostvars: Mapping[str, Any]) -> VrrpState:
    read = hostvars.get(READ) or {}
    if read.get("skipped") or "rc" not in read:
        return VrrpState({}, "its VRRP state was not read")
    if read["rc"] != 0:
        why = str(read.get("stderr") or read.get("msg") or "").strip()[:200]
        return VrrpState({}, f"reading keepalived.conf failed (exit {read['rc']}): {why}")
    return vrrp_state(str(read.get("stdout", "")))


def domain_problems_of(hostvars: Mapping[str, Any], hosts: Sequence[str]) -> list[str]:
    """Why the play must not go on: each failure domain of `hosts` in split brain, without
    master, or with a member unread ([]: it may)."""
    domains: dict[str, dict[str, VrrpState]] = {}
    for h in hosts:
        d = _domain(h, hostvars[h])
        if d is not None:
            domains.setdefault(d, {})[h] = _state(hostvars[h])
    return [p for d, states in sorted(domains.items()) for p in domain_problems(d, states)]


def pair_batch(hostvars: Mapping[str, Any], name: str = "") -> str:
    """The group a host's batch is: no failure domain (the waves), a domain's VRRP backup
    (first, one host at a time) or its master (last; so is a member whose state could not
    be read, which site.yml refuses anyway)."""
    if _domain(name or str(hostvars.get("inventory_hostname", "")), hostvars) is None:
        return FREE
    st = _state(hostvars)
    return BACKUP if st.role == "backup" else MASTER


def _guarded(f: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        if _MISSING:
            raise AnsibleFilterError(_MISSING)
        return f(*args, **kwargs)

    run.__doc__, run.__name__ = f.__doc__, f.__name__
    return run


class FilterModule:
    """Ansible's entry point for the collection's failure domain filters."""

    def filters(self) -> dict[str, Callable[..., Any]]:
        table: dict[str, Callable[..., Any]] = {
            "ipvs_fleet_vrrp_command": vrrp_command,
            "ipvs_fleet_domain_problems": domain_problems_of,
            "ipvs_fleet_pair_batch": pair_batch,
        }
        return {name: _guarded(f) for name, f in table.items()}
