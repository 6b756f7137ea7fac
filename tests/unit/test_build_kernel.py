"""The fix module's sources as data: what a build is made from, its identification, the
test-only variants, the sysctl defaults the table check compares with."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from ipvs_fleet import kernel
from ipvs_fleet.build.build import ID_HEADER
from ipvs_fleet.debian import RELEASES
from ipvs_fleet.errors import ConfigError
from ipvs_fleet.kernel.sysctls import defaults, integrity_problems, parse_dump

SOURCE = kernel.MODULE_DIR / f"{kernel.MODULE_NAME}.c"


def test_every_debian_line_builds_the_one_prekill_module() -> None:
    """One out-of-tree source for every line (the differences are #ifs in it), declaring
    the prekill design, built from the Kbuild that makes ip_vs_reuse.ko."""
    files = kernel.module_sources()
    assert [p.name for p in files] == ["Kbuild", f"{kernel.MODULE_NAME}.c"]
    assert "obj-m += ip_vs_reuse.o" in (kernel.MODULE_DIR / "Kbuild").read_text()
    for line in sorted(set(RELEASES.values())):
        assert kernel.build_inputs(line) == files
    assert kernel.reuse_design(files) == "prekill"


def test_the_module_is_safe_before_the_policy_is_applied() -> None:
    """Loaded on a host, it changes nothing until the class sets the knob: the knob reads 0
    in every new netns, registered beside IPVS's own sysctls, with its counters in /proc."""
    text = SOURCE.read_text()
    assert re.search(r"#else\n\trn->enabled = 0;\n#endif", text)
    assert '"net/ipv4/vs"' in text and '"conn_reuse_old_conntrack"' in text
    assert 'proc_create_net_single("ip_vs_reuse"' in text
    # It names its build: the header the build writes is included, after MODULE_LICENSE.
    assert text.rstrip().endswith(f'#include "{ID_HEADER}"')


def test_patchset_hash_follows_content(tmp_path: Path) -> None:
    files = kernel.module_sources()
    copies = []
    for p in files:
        shutil.copy(p, tmp_path / p.name)
        copies.append(tmp_path / p.name)
    assert kernel.patchset_hash(copies) == kernel.patchset_hash(files)
    copies[1].write_text(copies[1].read_text() + "\n")
    assert kernel.patchset_hash(copies) != kernel.patchset_hash(files)
    sid = kernel.set_id(files)
    assert sid == f"{kernel.PATCHSET_VERSION}+{kernel.patchset_hash(files)[:12]}"
    assert kernel.PATCHSET_VERSION.startswith("3.")


@pytest.mark.parametrize("variant", sorted(kernel.MODULE_VARIANTS))
def test_module_variants_build_the_same_source_with_their_define(variant: str) -> None:
    """A test-only variant is the shipped source compiled with one -D, which the source
    tests; its set id says which variant it is."""
    define = kernel.MODULE_VARIANTS[variant]
    assert re.search(rf"^#ifn?def {define}\b", SOURCE.read_text(), re.M), define
    files = kernel.build_inputs("6.1", variant)
    assert files == kernel.module_sources()
    assert kernel.set_id(files, variant) == f"{kernel.set_id(files)}.{variant}"


def test_nodesign_variant_drops_only_the_design_declaration() -> None:
    text = SOURCE.read_text()
    guarded = re.search(r"#ifndef IP_VS_REUSE_TEST_NO_DESIGN\b[^\n]*\n(.*?)#endif", text, re.S)
    assert guarded and guarded.group(1).strip() == 'MODULE_INFO(ipvs_fleet_reuse, "prekill");'


def test_unknown_and_removed_variants_are_clear_errors() -> None:
    assert kernel.VARIANTS == ("baddefault", "nodesign", "upstream")
    for gone in ("dislocated", "retrack", "seed"):
        with pytest.raises(ConfigError, match=f"unknown build variant '{gone}'"):
            kernel.build_inputs("6.1", gone)
    kernel.check_variant(None)
    kernel.check_variant("upstream")  # no line given: any


def test_upstream_variant_is_the_series_module_patch_on_its_line_only() -> None:
    """The `upstream` variant builds the upstream series' IPVS patches (bit 3 of
    conn_reuse_mode, then the lookups that skip a connection rescheduled away from), not the
    product's knob nor the selftest's patch, and only on the line the series is against."""
    files = kernel.build_inputs(kernel.UPSTREAM_LINE, "upstream")
    assert [p.parent for p in files] == [kernel.UPSTREAM] * 2
    assert [p.name[:4] for p in files] == ["0001", "0002"]
    assert "IP_VS_CONN_F_RESCHED" in files[1].read_text()
    assert not any("conn_reuse_old_conntrack" in p.read_text() for p in files)
    assert "sysctl_conn_reuse_mode(ipvs) & IP_VS_CONN_REUSE_KILL_CT" in files[0].read_text()
    assert kernel.reuse_design(files) == "none"
    with pytest.raises(ConfigError, match="upstream series is against 7.2, not 6.12"):
        kernel.build_inputs("6.12", "upstream")


def test_reference_seed_is_kept_but_never_built() -> None:
    assert (kernel.PATCHES / "reference").is_dir()
    inputs = [kernel.build_inputs(kernel.UPSTREAM_LINE, v) for v in (None, *kernel.VARIANTS)]
    assert not [p for files in inputs for p in files if kernel.PATCHES in p.parents]


def _dump(line: str) -> dict[str, str]:
    out = {}
    for k, v in defaults(line).items():
        if v is None:
            out[k] = "7258" if k == "sync_qlen_max" else "0-1"
        elif isinstance(v, list):
            out[k] = " ".join(map(str, v))
        else:
            out[k] = str(v)
    return out


@pytest.mark.parametrize("line", ["5.10", "6.1", "6.12", "7.2"])
def test_integrity_accepts_documented_defaults(line: str) -> None:
    assert integrity_problems(line, _dump(line)) == []


def test_integrity_catches_the_seed_shift() -> None:
    # What the seed does on 6.1: no vs_vars[] entry, every later key one field off.
    read = _dump("6.1")
    del read["conn_reuse_old_conntrack"]
    read["schedule_icmp"], read["ignore_tunneled"], read["run_estimation"] = "1", "0", "0"
    problems = integrity_problems("6.1", read)
    assert "conn_reuse_old_conntrack: missing" in problems
    assert "schedule_icmp: reads 1, default is 0" in problems
    assert "run_estimation: reads 0, default is 1" in problems


def test_integrity_knows_stock_tables_and_parses_dumps() -> None:
    stock = _dump("6.12")
    del stock["conn_reuse_old_conntrack"]
    assert integrity_problems("6.12", stock, patched=False) == []
    assert parse_dump("sync_threshold=3 50 \nconntrack=0\n") == {
        "sync_threshold": "3 50",
        "conntrack": "0",
    }
    assert integrity_problems("6.1", {**_dump("6.1"), "sync_threshold": "3"}) == [
        "sync_threshold: reads 3, default is 3 50"
    ]


def test_integrity_catches_a_knob_on_by_default() -> None:
    """The `baddefault` variant: the knob reads 1 in a fresh netns, which the sysctl_table
    check must report (the fix module must change nothing until the policy sets it)."""
    assert defaults("6.1")["conn_reuse_old_conntrack"] == 0
    read = {**_dump("6.1"), "conn_reuse_old_conntrack": "1"}
    assert integrity_problems("6.1", read) == ["conn_reuse_old_conntrack: reads 1, default is 0"]
