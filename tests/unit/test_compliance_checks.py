"""The host checks' own logic (checks/test_ipvs_host.py) on parsed facts, without a host:
the fix module ip_vs_reuse beside the stock IPVS modules, the knob, and reuse safety."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from ipvs_fleet.compliance import artifacts
from ipvs_fleet.compliance.expect import EXPECT_KEY, Expect
from ipvs_fleet.compliance.facts import HostFacts, NetnsTable
from ipvs_fleet.deploy.facts import IpvsLoadedModules
from tests.fixtures.loaded import loaded_output

KR = "6.1.0-57-cloud-amd64"
CHECKS = Path(__file__).resolve().parents[2] / "checks" / "test_ipvs_host.py"
_spec = importlib.util.spec_from_file_location("ipvs_host_checks", CHECKS)
assert _spec is not None and _spec.loader is not None
host_checks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(host_checks)

STOCK = ["ip_vs|-|-|-|-|-|-|-", "ip_vs_rr|-|-|-|-|-|-|-"]  # the distro's own, signed
FIX = "ip_vs_reuse|3.0+abc|-|OE|3.0+abc|-|3.0+abc|prekill"
KUBE_PROXY = {
    "ftp": False,
    "connmark": False,
    "invalid_drop": True,
    "invalid_drop_rule": "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
    "nat_rule": "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000",
}


def host_facts(
    rows: list[str], knob: int | None = 1, usage: dict[str, Any] | None = None
) -> HostFacts:
    """Facts of a host whose loaded IPVS modules are `rows` (tests.fixtures.loaded)."""
    return HostFacts(
        kernel_release=KR,
        tainted=12288,
        loaded=IpvsLoadedModules().process(loaded_output(rows)),
        sysctls={} if knob is None else {"conn_reuse_old_conntrack": knob},
        usage=usage or {},
        persisted={},
        fleet_file={},
        fleet_file_present=True,
        modules_load=[],
        netns=NetnsTable(ipvs=True, complete=True),
        kube_proxy=False,
    )


def run(check: str, facts: HostFacts, target: Any = None) -> tuple[str, list[dict[str, str]]]:
    """(the failure message or "" when it passes, its drift)."""
    node = SimpleNamespace(stash=pytest.Stash(), user_properties=[])
    expect = Expect(node)  # type: ignore[arg-type]  # a stand-in item: stash and properties
    fn = getattr(host_checks, f"test_{check}")
    kw: dict[str, Any] = {"facts": facts, "expect": expect}
    if "target" in fn.__code__.co_varnames:
        kw["target"] = target
    try:
        fn(**kw)
    except pytest.fail.Exception as e:
        return str(e.msg), node.stash[EXPECT_KEY]["drift"]
    return "", []


@pytest.fixture(autouse=True)
def artifact_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """The controller holds the artifact of set 3.0+abc for KR."""
    monkeypatch.setattr(artifacts, "patchset", lambda kr: "3.0+abc" if kr == KR else None)


def test_the_fix_module_beside_the_stock_modules_passes() -> None:
    assert run("patched_module", host_facts([*STOCK, FIX])) == ("", [])


def test_the_fix_module_not_loaded_is_named() -> None:
    msg, drift = run("patched_module", host_facts(STOCK))
    assert drift == [
        {
            "key": "ip_vs_reuse",
            "actual": "not loaded",
            "expected": f"loaded (the build in /lib/modules/{KR}/updates/ipvs-fleet)",
        }
    ]
    assert "not the fleet's (ip_vs_reuse beside the stock ones)" in msg


def test_another_build_of_the_fix_module_is_named_by_its_version() -> None:
    # loaded by insmod from elsewhere: its version is not the installed file's
    other = "ip_vs_reuse|3.0+abc.nodesign|-|OE|3.0+abc|-|3.0+abc|prekill"
    _, [drift] = run("patched_module", host_facts([*STOCK, other]))
    assert drift["key"] == "ip_vs_reuse loaded (/sys/module/ip_vs_reuse/version)"
    assert drift["expected"].endswith("updates/ipvs-fleet, 3.0+abc")
    assert drift["actual"] == "another build: 3.0+abc.nodesign"


def test_an_installed_build_other_than_the_artifact_fails() -> None:
    old = "ip_vs_reuse|3.0+old|-|OE|3.0+old|-|3.0+old|prekill"
    _, [drift] = run("patched_module", host_facts([*STOCK, old]))
    assert (drift["expected"], drift["actual"]) == ("3.0+abc", "3.0+old")


def test_an_out_of_tree_ipvs_module_beside_the_fix_is_named() -> None:
    # a 2.x patched ip_vs still loaded (its files gone from updates/): not fixable live
    rows = ["ip_vs|2.0+def|-|OE|-|-|-|-", "ip_vs_rr|-|-|-|-|-|-|-", FIX]
    msg, drift = run("patched_module", host_facts(rows))
    assert drift == []
    assert "not the stock in-tree build: ip_vs (taint OE, version 2.0+def)" in msg
    assert "ip_vs_rr" not in msg


def test_knob_absent_names_the_fix_module() -> None:
    _, [drift] = run("knob_present", host_facts(STOCK, knob=None))
    assert drift["actual"] == "absent (ip_vs_reuse not loaded)"


def test_reuse_safety_reads_the_fix_modules_design() -> None:
    k8s = SimpleNamespace(settings=SimpleNamespace(allow_reuse_with=None))
    assert run("reuse_safety", host_facts([*STOCK, FIX], usage=KUBE_PROXY), k8s) == ("", [])
    # no declared design (or a build whose module info the fleet did not install)
    nodesign = "ip_vs_reuse|3.0+abc|-|OE|3.0+abc|-|3.0+abc|-"
    msg, _ = run("reuse_safety", host_facts([*STOCK, nodesign], usage=KUBE_PROXY), k8s)
    assert "knob=1 is unsafe here" in msg and "reuse design is 'none'" in msg
    assert "--ctstate INVALID -j DROP" in msg
    # knob 0: nothing to judge
    assert run("reuse_safety", host_facts([*STOCK, nodesign], knob=0, usage=KUBE_PROXY), k8s) == (
        "",
        [],
    )
