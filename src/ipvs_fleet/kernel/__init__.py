"""The IPVS patch series, one per supported kernel line, and what identifies a build of it.

Layout: `patches/<line>/NNNN-*.patch` (applied in name order with `patch -p1` to the root of
the matching Debian `linux-source`), `patches/reference/` (the seed in its pre-5.9 form, never
built), `patches/dislocated/<line>/` (a test-only replacement for 0001 that reproduces the
seed's sysctl-table bug, so the table-integrity check can be shown to fail), `patches/retrack/`
(a test-only replacement for 0002: the 1.x reuse design, so the lab can show what it breaks and
the interlock and the reuse_safety check refusing it). `upstream/` is the series proposed
upstream (issue 18) against UPSTREAM_LINE's source; the test-only variant `upstream` builds
the module from its patches that touch IPVS (bit 3 of conn_reuse_mode, not the product's knob)
so the lab can run its kselftest against it.
"""

from __future__ import annotations

import hashlib
import re
from functools import cache
from pathlib import Path
from typing import Any

from ipvs_fleet.errors import ConfigError, load_yaml_file

# Bump when the series changes in a way a reader should see in `modinfo`.
PATCHSET_VERSION = "2.0"
PATCHES = Path(__file__).parent / "patches"
SYSCTL_DEFAULTS = Path(__file__).parent / "sysctl_defaults.yml"
UPSTREAM = Path(__file__).parent / "upstream"
UPSTREAM_LINE = "7.2"  # the kernel line the upstream series applies to (its cover letter)
REUSE_DESIGNS = Path(__file__).parent / "reuse_designs.yml"
# Module info fields carried by every built module (MODINFO_SET) and by ip_vs (MODINFO_REUSE).
MODINFO_SET = "ipvs_fleet"
MODINFO_REUSE = "ipvs_fleet_reuse"
# Build variants besides the shipped one; test-only, never deployed.
VARIANTS = ("dislocated", "retrack", "upstream")


def lines() -> list[str]:
    """Kernel lines that have a patch series."""
    return sorted(p.name for p in PATCHES.iterdir() if re.fullmatch(r"\d+\.\d+", p.name))


def series(line: str, variant: str | None = None) -> list[Path]:
    """The patch files for a kernel line, in the order they apply."""
    folder = PATCHES / line
    if not folder.is_dir():
        raise ConfigError(f"no patch series for kernel line {line} (have: {', '.join(lines())})")
    files = sorted(folder.glob("*.patch"))
    if variant is None:
        return files
    if variant not in VARIANTS:
        raise ConfigError(f"unknown build variant {variant!r} (known: {', '.join(VARIANTS)})")
    if variant == "upstream":
        if line != UPSTREAM_LINE:
            raise ConfigError(f"the upstream series is against {UPSTREAM_LINE}, not {line}")
        return upstream_module_patches()
    swap = {p.name[:4]: p for p in (PATCHES / variant / line).glob("*.patch")}
    if not swap:
        raise ConfigError(f"variant {variant} has no patches for kernel line {line}")
    return [swap.get(p.name[:4], p) for p in files]


def upstream_module_patches() -> list[Path]:
    """The upstream series' patches that change the modules (not the selftest's), in order."""
    return [
        p
        for p in sorted(UPSTREAM.glob("[0-9][0-9][0-9][0-9]-*.patch"))
        if "\n+++ b/net/netfilter/ipvs/" in p.read_text()
    ]


def patchset_hash(files: list[Path]) -> str:
    """sha256 over the names and contents of a series: changes whenever a patch does."""
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def set_id(files: list[Path], variant: str | None = None) -> str:
    """The value of the `ipvs_fleet` module info field: version, series hash, variant."""
    sid = f"{PATCHSET_VERSION}+{patchset_hash(files)[:12]}"
    return f"{sid}.{variant}" if variant else sid


def reuse_design(files: list[Path]) -> str:
    """What knob=1 does in this series, as declared by its `ipvs_fleet_reuse` module info."""
    for p in files:
        m = re.search(rf'MODULE_INFO\({MODINFO_REUSE}, "([\w-]+)"\)', p.read_text())
        if m:
            return m.group(1)
    return "none"


@cache
def reuse_designs() -> dict[str, dict[str, Any]]:
    """`reuse_designs.yml`: design -> {what, unsafe_with: [IpvsUsage keys]}."""
    data = load_yaml_file(REUSE_DESIGNS, "reuse designs")
    designs: dict[str, dict[str, Any]] = data["designs"]
    return designs


# How each ruleset shape of `unsafe_with` is named in a refusal, and the IpvsUsage key that
# holds the offending rule's text.
_SHAPES = {"invalid_drop": ("an INVALID-drop rule", "invalid_drop_rule"),
           "nat_rule": ("a nat-table rule", "nat_rule")}


def reuse_unsafe(design: str | None, usage: dict[str, Any]) -> str | None:
    """Why knob=1 is unsafe with a module of this reuse design on a host with this live
    ruleset (the IpvsUsage fact), naming the rule; None when it is safe."""
    designs = reuse_designs()
    name = design if design in designs else "unknown"
    for shape in designs[name]["unsafe_with"]:
        if usage.get(shape):
            what, key = _SHAPES[shape]
            rule = usage.get(key)
            return (f"the loaded/installed ip_vs reuse design is '{design or 'none'}' "
                    f"({designs[name]['what']}), and the host has {what}"
                    + (f": {rule}" if isinstance(rule, str) else ""))
    return None
