"""SSH host keys: checked strictly unless the inventory or the user says otherwise.

pyinfra's SSH connector trusts an unknown host key on first use (`accept-new`) unless the
host's data says otherwise. ipvs-fleet changes that default for every inventory it is run
with, through the data of pyinfra's `all` group (`group_data/all.py` at the repository root,
read when pyinfra runs from there, as `ipvs-fleet rollout` runs it, and
`inventory/group_data/all.py`, read for the inventories in `inventory/`):

- `yes` (strict): a host whose key is not in known_hosts (the inventory's
  `ssh_known_hosts_file`, else ~/.ssh/known_hosts or the ssh_config's UserKnownHostsFile),
  or whose key changed, is refused;
- the inventory's own `ssh_strict_host_key_checking` (host, group or `all` data) wins;
- trust on first use only when asked for: that setting, or
  `--data ssh_strict_host_key_checking=accept-new` (pyinfra and `ipvs-fleet rollout`).
"""

from __future__ import annotations

from typing import Any

KEY = "ssh_strict_host_key_checking"
STRICT = "yes"


def default_checking(inventory: Any) -> str:
    """The `all` group's host key checking: the inventory file's own `all` value (pyinfra's
    group_data would override it), else strict. `inventory`: the one pyinfra is loading."""
    own = inventory.get_data().get(KEY) if inventory is not None else None
    return str(own) if own else STRICT
