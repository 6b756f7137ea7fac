"""The patch series as data: order, hashes, identification, variants, sysctl defaults."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ipvs_fleet import kernel
from ipvs_fleet.debian import RELEASES
from ipvs_fleet.errors import ConfigError
from ipvs_fleet.kernel.sysctls import defaults, integrity_problems, parse_dump


def test_every_debian_line_has_a_handback_series() -> None:
    assert kernel.lines() == sorted(RELEASES.values())
    for line in kernel.lines():
        files = kernel.series(line)
        assert [p.name[:4] for p in files] == ["0001", "0002"]
        assert kernel.reuse_design(files) == "handback"
        text = "".join(p.read_text() for p in files)
        # Both drop sites honour the knob and hand the SYN back; no re-tracking inside
        # IPVS's hook (the 1.x design that skipped every nat rule), no forced NAT bits.
        assert text.count("ip_vs_reuse_old_conntrack(ipvs, cp, skb,") == 2
        assert text.count("return ip_vs_hand_back(ipvs, hooknum, skb, af);") == 2
        assert "nf_ct_kill(ct);" in text and "netif_rx(skb);" in text
        assert "ip_local_out(ipvs->net, skb->sk, skb);" in text
        assert "nf_conntrack_in(" not in text and "IPS_DST_NAT_DONE" not in text
        # The module is safe before the policy is applied: the stock drop by default.
        assert "ipvs->sysctl_conn_reuse_old_conntrack = 0;" in text
        assert '.procname\t= "conn_reuse_old_conntrack"' in text  # the vs_vars[] entry


def test_patchset_hash_follows_content(tmp_path: Path) -> None:
    files = kernel.series("6.1")
    copies = []
    for p in files:
        shutil.copy(p, tmp_path / p.name)
        copies.append(tmp_path / p.name)
    assert kernel.patchset_hash(copies) == kernel.patchset_hash(files)
    copies[1].write_text(copies[1].read_text() + "\n")
    assert kernel.patchset_hash(copies) != kernel.patchset_hash(files)
    sid = kernel.set_id(files)
    assert sid == f"{kernel.PATCHSET_VERSION}+{kernel.patchset_hash(files)[:12]}"


def test_dislocated_variant_swaps_only_the_sysctl_patch() -> None:
    plain, bad = kernel.series("6.1"), kernel.series("6.1", "dislocated")
    assert plain[1] == bad[1] and plain[0] != bad[0]
    assert "dislocated" in str(bad[0])
    assert kernel.set_id(bad, "dislocated").endswith(".dislocated")
    with pytest.raises(ConfigError, match="no patches for kernel line 6.12"):
        kernel.series("6.12", "dislocated")
    with pytest.raises(ConfigError, match="unknown build variant"):
        kernel.series("6.1", "seed")


def test_upstream_variant_is_the_series_module_patch_on_its_line_only() -> None:
    """The `upstream` variant builds the upstream series' IPVS patch alone (bit 3 of
    conn_reuse_mode), not the product's knob, and only on the line the series is against."""
    files = kernel.series(kernel.UPSTREAM_LINE, "upstream")
    assert [p.parent for p in files] == [kernel.UPSTREAM]
    assert "conn_reuse_old_conntrack" not in files[0].read_text()
    assert "sysctl_conn_reuse_mode(ipvs) & 4" in files[0].read_text()
    assert kernel.reuse_design(files) == "none"
    with pytest.raises(ConfigError, match="upstream series is against 7.2, not 6.12"):
        kernel.series("6.12", "upstream")


def test_unknown_line_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="no patch series for kernel line 4.19"):
        kernel.series("4.19")


def test_reference_seed_is_kept_but_not_a_line() -> None:
    assert (kernel.PATCHES / "reference").is_dir()
    assert "reference" not in kernel.lines()


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
