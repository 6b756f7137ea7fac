"""SSH host keys: checked strictly unless the inventory or the user says otherwise.

pyinfra's SSH connector trusts an unknown host key on first use (`accept-new`) unless the
host's data says otherwise, and it connects to every host before the deploy file runs. Data
from `group_data/` is read only from the working directory and the inventory's directory, so
strict checking is carried by the inventory itself, read from any directory:

- `strict_host_keys(globals())` at the end of an inventory file (`ipvs-fleet init`'s
  template) gives pyinfra's `all` group `yes`; the lab and Ansible inventories
  (`inventory/*.py`) set it on every host they produce;
- `yes` (strict): a host whose key is not in known_hosts (the inventory's
  `ssh_known_hosts_file`, else ~/.ssh/known_hosts or the ssh_config's UserKnownHostsFile),
  or whose key changed, is refused at the connect;
- the inventory's own `ssh_strict_host_key_checking` (host, group or `all` data) wins;
  trust on first use only when asked for: that setting, or
  `--data ssh_strict_host_key_checking=accept-new` (pyinfra and `ipvs-fleet rollout`);
- the deploy and the rollback refuse, before any operation, an SSH host whose data set no
  checking at all (`unchecked`): pyinfra connected to it trusting a new key.

`group_data/all.py` (the checkout's, and `ipvs-fleet init`'s) still sets `yes` for ad-hoc
inventories (`pyinfra host1,host2 ...`) run from the repository.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

KEY = "ssh_strict_host_key_checking"
STRICT = "yes"


def default_checking(inventory: Any) -> str:
    """The `all` group's host key checking: the inventory file's own `all` value (pyinfra's
    group_data would override it), else strict. `inventory`: the one pyinfra is loading."""
    own = inventory.get_data().get(KEY) if inventory is not None else None
    return str(own) if own else STRICT


def _hosts(group: Any) -> list[Any] | None:
    """The hosts of a pyinfra inventory group (a list, or a (hosts, data) tuple), else None."""
    hosts = group[0] if isinstance(group, tuple) and len(group) == 2 else group
    if isinstance(hosts, list) and all(isinstance(h, (str, tuple)) for h in hosts):
        return hosts
    return None


def strict_host_keys(groups: Mapping[str, Any]) -> dict[str, Any]:
    """pyinfra's `all` group for an inventory file's module variables `groups`: every host of
    its groups, with host keys checked strictly unless the file's own `all` data says how.

        globals().update(strict_host_keys(globals()))  # last line of the inventory file

    Host and group data keep winning over `all` data, `--data` over everything.
    """
    own = groups.get("all")
    if own is not None:
        hosts, data = own if isinstance(own, tuple) else (own, {})
        return {"all": (hosts, {KEY: STRICT, **data})}
    names: list[str] = []
    for name, group in groups.items():
        members = None if name.startswith("_") else _hosts(group)
        for h in members or []:
            host = h[0] if isinstance(h, tuple) else h
            if host not in names:
                names.append(host)
    return {"all": (names, {KEY: STRICT})}


def unchecked(name: str, checking: Any, known_hosts: Any) -> str | None:
    """Why the deploy refuses SSH host `name` whose effective data `checking` (None: set
    nowhere) is its ssh_strict_host_key_checking, or None. Set to anything, it was asked for;
    set nowhere, pyinfra connected with its default, trusting a new key on first use."""
    if checking is not None:
        return None
    where = known_hosts or "~/.ssh/known_hosts"
    return (
        f"host {name}: SSH host keys are not checked strictly: its inventory sets no "
        f"{KEY}, so pyinfra connected trusting a new key on first use (it may just have "
        f"added this host's key to {where}). Give the inventory strict checking (end it "
        "with `globals().update(strict_host_keys(globals()))`, from ipvs_fleet.hostkeys, as "
        f"`ipvs-fleet init`'s does, or set {KEY}: yes in its data), or ask for trust on "
        f"first use: {KEY}=accept-new in its data or `--data {KEY}=accept-new`"
    )
