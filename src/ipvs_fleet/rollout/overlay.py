"""Host data for a child's inventory given by environment, never on its command line.

Command lines are world-readable (`ps`, /proc/PID/cmdline) and logged; a secret such as
`--data _sudo_password=...` must reach the pyinfra child another way, and the gate's checks
child must reach the hosts as the deploy does (`--sudo`, the connection's --data), which
the inventory file alone does not say. `overlaid()` gives such a child a small wrapper
inventory (same file name, so pyinfra's file-named group is kept, in a private 0700 dir)
whose hosts are the real inventory's, with their merged host and group data, plus the data
in $IPVS_FLEET_INVENTORY_OVERLAY (JSON; values parsed as pyinfra parses `--data`).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

OVERLAY_ENV = "IPVS_FLEET_INVENTORY_OVERLAY"
WRAPPER = '''"""Written by ipvs-fleet rollout: {real} with host data from ${env}."""
from ipvs_fleet.rollout.overlay import overlay_groups

globals().update(overlay_groups({real!r}))
'''


@contextmanager
def overlaid(
    inventory: Path, data: Mapping[str, str], env: dict[str, str] | None
) -> Iterator[tuple[Path, dict[str, str] | None]]:
    """(inventory, environment) for a child whose hosts get `data` on top of their own: the
    inventory and `env` as they are when `data` is empty, else a wrapper inventory (removed
    after the block) and `env` (default os.environ) with the data in it."""
    if not data:
        yield inventory, env
        return
    with tempfile.TemporaryDirectory(prefix="ipvs-fleet-inventory-") as d:
        wrapper = Path(d) / inventory.name
        fd = os.open(wrapper, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(WRAPPER.format(real=str(inventory.absolute()), env=OVERLAY_ENV))
        base = dict(os.environ if env is None else env)
        yield wrapper, {**base, OVERLAY_ENV: json.dumps(dict(data))}


def overlay_groups(inventory: str) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """The wrapper's groups: {group: [(host, its data + the overlay)]}, in inventory order."""
    from pyinfra_cli.util import parse_cli_arg

    from ipvs_fleet.compliance.inventory import load_inventory

    raw = json.loads(os.environ.get(OVERLAY_ENV) or "{}")
    extra = {k: parse_cli_arg(v) if isinstance(v, str) else v for k, v in raw.items()}
    log = logging.getLogger("pyinfra")
    level = log.level
    try:
        hosts = load_inventory(inventory)
    finally:
        log.setLevel(level)  # load_inventory quiets pyinfra: the deploy's output is parsed
    groups: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for h in hosts:
        data = {**h.data, **extra}
        for g in h.groups:
            groups.setdefault(g, []).append((h.name, data))
    return groups
