"""The fix module ip_vs_reuse, and what identifies a build of it.

Layout: `module/` holds the module's source (`ip_vs_reuse.c`, `Kbuild`), built out of tree
against a kernel's `linux-headers` and loaded beside the distro's own, unmodified ip_vs (one
source for every kernel line; the line differences are `#if`s in the source).
`patches/reference/` keeps the 2020 seed in its pre-5.9 form (never built). `upstream/` is
the series proposed upstream (issue 18) against UPSTREAM_LINE's source; the test-only variant
`upstream` builds a patched ip_vs set from its patches that touch IPVS so the lab can run its
kselftest against it. The other test-only variants build the module with a `-D` flag that
breaks one thing a check must catch.
"""

from __future__ import annotations

import hashlib
import re
from functools import cache
from pathlib import Path
from typing import Any

from ipvs_fleet.errors import ConfigError, load_yaml_file

# Bump when the module changes in a way a reader should see in `modinfo`.
PATCHSET_VERSION = "3.0"
MODULE_DIR = Path(__file__).parent / "module"
MODULE_NAME = "ip_vs_reuse"
PATCHES = Path(__file__).parent / "patches"
SYSCTL_DEFAULTS = Path(__file__).parent / "sysctl_defaults.yml"
UPSTREAM = Path(__file__).parent / "upstream"
UPSTREAM_LINE = "7.2"  # the kernel line the upstream series applies to (its cover letter)
REUSE_DESIGNS = Path(__file__).parent / "reuse_designs.yml"
# Module info fields carried by every built module: the set id, and what knob=1 does.
MODINFO_SET = "ipvs_fleet"
MODINFO_REUSE = "ipvs_fleet_reuse"
# Test-only module variants (never deployed) and the define each is compiled with:
# baddefault: the knob reads 1 in a new netns (the sysctl-table check must fail);
# nodesign: no `ipvs_fleet_reuse` module info (the reuse-safety check and the interlock must
# refuse it behind an INVALID-drop or nat rule).
MODULE_VARIANTS = {
    "baddefault": "IP_VS_REUSE_TEST_BAD_DEFAULT",
    "nodesign": "IP_VS_REUSE_TEST_NO_DESIGN",
}
VARIANTS = (*MODULE_VARIANTS, "upstream")


def module_sources() -> list[Path]:
    """The fix module's source files, in name order (what a build compiles and hashes)."""
    return sorted(p for p in MODULE_DIR.iterdir() if p.is_file())


def check_variant(variant: str | None, line: str | None = None) -> None:
    """ConfigError unless `variant` is None or a known one that exists for `line`."""
    if variant is None:
        return
    if variant not in VARIANTS:
        raise ConfigError(f"unknown build variant {variant!r} (known: {', '.join(VARIANTS)})")
    if variant == "upstream" and line is not None and line != UPSTREAM_LINE:
        raise ConfigError(f"the upstream series is against {UPSTREAM_LINE}, not {line}")


def build_inputs(line: str, variant: str | None = None) -> list[Path]:
    """What a build of `line` (and `variant`) is made from: the module's sources, or for the
    `upstream` variant the upstream series' patches to IPVS."""
    check_variant(variant, line)
    return upstream_module_patches() if variant == "upstream" else module_sources()


def upstream_module_patches() -> list[Path]:
    """The upstream series' patches that change the modules (not the selftest's), in order."""
    return [
        p
        for p in sorted(UPSTREAM.glob("[0-9][0-9][0-9][0-9]-*.patch"))
        if "\n+++ b/net/netfilter/ipvs/" in p.read_text()
    ]


def patchset_hash(files: list[Path]) -> str:
    """sha256 over the names and contents of a build's inputs: changes whenever one does."""
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def set_id(files: list[Path], variant: str | None = None) -> str:
    """The value of the `ipvs_fleet` module info field: version, inputs' hash, variant."""
    sid = f"{PATCHSET_VERSION}+{patchset_hash(files)[:12]}"
    return f"{sid}.{variant}" if variant else sid


def reuse_design(files: list[Path]) -> str:
    """What knob=1 does in these sources, as declared by their `ipvs_fleet_reuse` module
    info ("none" when they declare none)."""
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
_SHAPES = {
    "invalid_drop": ("an INVALID-drop rule", "invalid_drop_rule"),
    "nat_rule": ("a nat-table rule", "nat_rule"),
}


def reuse_unsafe(design: str | None, usage: dict[str, Any]) -> str | None:
    """Why knob=1 is unsafe with a module of this reuse design on a host with this live
    ruleset (the IpvsUsage fact), naming the rule; None when it is safe."""
    designs = reuse_designs()
    name = design if design in designs else "unknown"
    for shape in designs[name]["unsafe_with"]:
        if usage.get(shape):
            what, key = _SHAPES[shape]
            rule = usage.get(key)
            return (
                f"the loaded/installed ip_vs_reuse's reuse design is '{design or 'none'}' "
                f"({designs[name]['what']}), and the host has {what}"
                + (f": {rule}" if isinstance(rule, str) else "")
            )
    return None
