"""Load a pyinfra inventory file into plain host records the checks can use."""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ipvs_fleet.errors import ConfigError


@dataclass(frozen=True)
class FleetHost:
    """One inventory host: its name, groups and merged host/group data.

    >>> FleetHost("lab-1", ("k8s", "lab"), {"ipvs_host_class": "k8s_node", "ssh_port": 2201})
    """

    name: str
    groups: tuple[str, ...]
    data: dict[str, Any] = field(hash=False, compare=False)

    @property
    def host_class(self) -> str | None:
        cls = self.data.get("ipvs_host_class")
        return str(cls) if cls is not None else None


def load_inventory(path: str | Path) -> list[FleetHost]:
    """Every host of a pyinfra inventory file (group_data/ applied), in file order.

    Raises ConfigError naming the file when it is missing, fails to load or has no hosts.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: inventory file not found")
    # Imported here: pyinfra is heavy and only needed once an inventory is read.
    from pyinfra.api import Config, Inventory, State
    from pyinfra.context import ctx_state
    from pyinfra_cli.inventory import make_inventory_from_files

    # pyinfra logs a warning per unresolvable group_data dir; the checks have their own output.
    logging.getLogger("pyinfra").setLevel(logging.ERROR)
    try:
        # pyinfra's loader runs the file with a State in context and reads group_data/ from
        # the working directory and the inventory's directory, as the pyinfra CLI does.
        with ctx_state.use(State(Inventory(([], {})), Config())):
            inv = make_inventory_from_files(str(p), cwd=str(Path.cwd()))
    except Exception as e:  # the file is user code: any error is a bad inventory
        # pyinfra wraps the file's own exception (UnexpectedExternalError, whose str() fails):
        # name the one the file raised.
        inner = getattr(e, "exception", e)
        raise ConfigError(f"{p}: cannot load inventory: {type(inner).__name__}: {inner}") from e
    hosts = [FleetHost(h.name, tuple(g for g in h.groups), dict(h.data.dict())) for h in inv]
    if not hosts:
        raise ConfigError(f"{p}: inventory has no hosts")
    return hosts


def select_hosts(hosts: list[FleetHost], limit: str | list[str] | None) -> list[FleetHost]:
    """Hosts matching `--limit` (comma-separated host names, group names or globs), as pyinfra.

    Raises ConfigError if the limit matches no host.
    """
    if not limit:
        return hosts
    parts = limit.split(",") if isinstance(limit, str) else [x for s in limit for x in s.split(",")]
    patterns = [s.strip() for s in parts if s.strip()]
    chosen = [
        h for h in hosts if any(fnmatch.fnmatch(h.name, pat) or pat in h.groups for pat in patterns)
    ]
    if not chosen:
        raise ConfigError(f"--limit {','.join(patterns)}: matches no host or group in inventory")
    return chosen
