"""The documented default of every IPVS sysctl per kernel line, as the table check reads them.

The table itself is the kernel package's (`src/ipvs_fleet/kernel/sysctl_defaults.yml`, read
by `ipvs_fleet.kernel.sysctls`); this only shapes it for comparison with a netns dump.
"""

from __future__ import annotations

import re
from typing import Any

from ipvs_fleet.errors import ConfigError
from ipvs_fleet.kernel import sysctls


def _norm(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, list | tuple):
        return " ".join(str(x) for x in v)
    return " ".join(str(v).split())


def patched_keys() -> set[str]:
    """Keys only the fix module ip_vs_reuse registers (their absence is the knob check's
    finding)."""
    return sysctls.patched_keys()


def for_kernel(kernel_release: str) -> dict[str, str | None] | None:
    """{key: default} expected in a fresh netns on this kernel release (None: host-dependent,
    only checked to be present); None when the kernel line has no documented table."""
    m = re.match(r"(\d+\.\d+)", kernel_release)
    try:
        table = sysctls.defaults(m.group(1) if m else kernel_release)
    except ConfigError:
        return None
    return {str(k): _norm(v) for k, v in table.items()}
