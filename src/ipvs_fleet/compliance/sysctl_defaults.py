"""The documented default of every IPVS sysctl, per kernel line, for the table check."""

from __future__ import annotations

import functools
import re
from typing import Any

import yaml

from ipvs_fleet.kernel import SYSCTL_DEFAULTS

# Documentation/networking/ipvs-sysctl.rst, plus the patch's knob (default 1, as the seed).
# Used until the kernel package ships its per-line table (src/ipvs_fleet/kernel/).
DOCUMENTED: dict[str, str] = {
    "conn_reuse_old_conntrack": "1",
    "am_droprate": "10",
    "amemthresh": "1024",
    "backup_only": "0",
    "cache_bypass": "0",
    "conn_reuse_mode": "1",
    "conntrack": "0",
    "drop_entry": "0",
    "drop_packet": "0",
    "expire_nodest_conn": "0",
    "expire_quiescent_template": "0",
    "ignore_tunneled": "0",
    "nat_icmp_send": "0",
    "pmtu_disc": "1",
    "schedule_icmp": "0",
    "secure_tcp": "0",
    "sloppy_sctp": "0",
    "sloppy_tcp": "0",
    "snat_reroute": "1",
    "sync_persist_mode": "0",
    "sync_ports": "1",
    "sync_version": "1",
}


def _norm(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, list | tuple):
        return " ".join(str(x) for x in v)
    return " ".join(str(v).split())


@functools.cache
def _table() -> dict[str, Any] | None:
    if not SYSCTL_DEFAULTS.is_file():
        return None
    doc = yaml.safe_load(SYSCTL_DEFAULTS.read_text())
    return doc if isinstance(doc, dict) else None


def patched_keys() -> set[str]:
    """Keys only the patched module set has (their absence is the knob check's finding)."""
    doc = _table() or {}
    return set(doc.get("patched") or ["conn_reuse_old_conntrack"])


def for_kernel(kernel_release: str) -> dict[str, str | None]:
    """{key: default} expected in a fresh netns on this kernel release; None: host-dependent,
    only checked to be present."""
    doc = _table()
    if doc is None:
        return dict(DOCUMENTED)
    m = re.match(r"(\d+\.\d+)", kernel_release)
    line = m.group(1) if m else ""
    lines = doc.get("lines") or {}
    if line not in lines:
        return dict(DOCUMENTED)
    return {str(k): _norm(v) for k, v in lines[line].items()}
