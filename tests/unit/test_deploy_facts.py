"""Parsing of the deploy's facts and the reuse interlock (pure logic; the lab tests run them
against real hosts)."""

from __future__ import annotations

import pytest

from ipvs_fleet import kernel
from ipvs_fleet.build import dkms
from ipvs_fleet.deploy.facts import (
    DkmsReady,
    IpvsInstalledModules,
    IpvsInstalledSet,
    IpvsLoadedModules,
    IpvsSysctls,
    IpvsUsage,
    Lockdown,
    dkms_problems,
    refuses_unsigned,
)
from ipvs_fleet.deploy.plan import decide, interlock, read_facts
from ipvs_fleet.errors import ConfigError, FleetError
from ipvs_fleet.policy import load_policy

SHA = "a" * 64


U = "/lib/modules/6.1.0-57-cloud-amd64/updates/ipvs-fleet"


def modinfo(name: str, version: str, srcversion: str, patchset: str, reuse: str = "") -> list[str]:
    """`modinfo` output for an installed file, as the facts read it (one call, many files)."""
    return [
        f"filename:       {U}/{name}.ko",
        f"version:        {version}",
        *([f"ipvs_fleet:     {patchset}"] if patchset else []),
        *([f"ipvs_fleet_reuse: {reuse}"] if reuse else []),
        "parm:           conn_tab_bits:Set connections' hash size (int)",
        f"srcversion:     {srcversion}",
        f"name:           {name}",
    ]


def test_loaded_modules_patched_only_when_the_loaded_build_is_the_installed_one():
    out = IpvsLoadedModules().process(
        [
            "loaded|ip_vs|-|-|-",  # the distro's own, beside the fix module
            "loaded|ip_vs_rr|-|-|-",
            "loaded|ip_vs_reuse|3.0+abc|-|OE",
            *modinfo("ip_vs_reuse", "3.0+abc", "AAA", "3.0+abc", "prekill"),
        ]
    )
    assert out["ip_vs_reuse"] == {
        "version": "3.0+abc",
        "srcversion": None,
        "taint": "OE",
        "patched": True,
        "patchset": "3.0+abc",
        "reuse": "prekill",
    }
    assert (
        out["ip_vs"]
        == out["ip_vs_rr"]
        == {
            "version": None,
            "srcversion": None,
            "taint": "",
            "patched": False,
            "patchset": None,
            "reuse": None,
        }
    )


def test_an_older_build_or_a_foreign_ip_vs_is_not_the_installed_one():
    out = IpvsLoadedModules().process(
        [
            "loaded|ip_vs|2.0+old|-|OE",  # a patched ip_vs of ipvs-fleet 2.x, no file of ours
            "loaded|ip_vs_reuse|3.0+old|-|OE",  # an older fix module than the installed one
            *modinfo("ip_vs_reuse", "3.0+abc", "AAA", "3.0+abc", "prekill"),
        ]
    )
    assert out["ip_vs_reuse"]["patched"] is False and out["ip_vs_reuse"]["patchset"] is None
    assert out["ip_vs_reuse"]["version"] == "3.0+old"
    assert out["ip_vs"]["patched"] is False and out["ip_vs"]["taint"] == "OE"


def test_loaded_modules_match_by_srcversion_and_ignore_files_of_unloaded_modules():
    out = IpvsLoadedModules().process(
        [
            "loaded|ip_vs_reuse|-|AAA|OE",
            *modinfo("ip_vs_reuse", "", "AAA", "3.0+abc"),
            *modinfo("ip_vs_wrr", "3.0+abc", "W", "3.0+abc"),
        ]
    )
    assert list(out) == ["ip_vs_reuse"]
    assert out["ip_vs_reuse"]["patched"] is True and out["ip_vs_reuse"]["reuse"] is None


def test_installed_modules():
    lines = [f"{SHA}  ip_vs_reuse.ko", f"{'b' * 64} *other.ko", "garbage"]
    assert IpvsInstalledModules().process(lines) == {"ip_vs_reuse.ko": SHA, "other.ko": "b" * 64}
    # files in place but depmod never ran (install cut off): not installed, so redo it
    assert IpvsInstalledModules().process(["depmod-missing", *lines]) == {}
    # depmod's index is asked for the fix module's file
    cmd = str(IpvsInstalledModules().command("6.1.0-57-cloud-amd64"))
    assert "^updates/ipvs-fleet/ip_vs_reuse.ko" in cmd


def test_sysctls_parse_ints_and_pairs():
    out = IpvsSysctls().process(
        [
            "/proc/sys/net/ipv4/vs/conn_reuse_mode:1",
            "/proc/sys/net/ipv4/vs/sync_threshold:3\t50",
            "/proc/sys/net/ipv4/vs/est_cpulist:0-1",
            "/proc/sys/net/ipv4/vs/conntrack:0",
        ]
    )
    assert out == {"conn_reuse_mode": 1, "sync_threshold": [3, 50], "conntrack": 0}


def usage(lines):
    return IpvsUsage().process(lines)


def test_usage_ftp_by_module_and_by_service():
    assert usage(["## lsmod", "ip_vs_ftp", "ip_vs"])["ftp"]
    u = usage(["## lsmod", "ip_vs", "## ipvsadm", "TCP  10.0.0.1:21 rr"])
    assert u["ftp"] and "10.0.0.1:21" in u["ftp_reason"]
    assert not usage(["## lsmod", "ip_vs", "## ipvsadm", "TCP  10.0.0.1:2121 rr"])["ftp"]


def test_usage_connmark_and_invalid_drop():
    u = usage(
        [
            "## iptables",
            "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP",
            "-A PREROUTING -j CONNMARK --restore-mark",
        ]
    )
    assert u["invalid_drop"] and u["connmark"]
    u = usage(["## nft", "ct state invalid drop"])
    assert u["invalid_drop"] and not u["connmark"]
    assert not usage(["## iptables", "-A FORWARD -m conntrack --ctstate INVALID -j ACCEPT"])[
        "invalid_drop"
    ]


def test_lockdown():
    off = Lockdown().process(["lockdown=", "sig_enforce=N", "secure_boot=0"])
    assert refuses_unsigned(off) is None
    on = Lockdown().process(["lockdown=integrity", "sig_enforce=N", "secure_boot=0"])
    assert "integrity" in (refuses_unsigned(on) or "")
    assert refuses_unsigned(Lockdown().process(["lockdown=", "sig_enforce=Y", "secure_boot=0"]))


def test_interlock():
    policy = load_policy()
    k8s = policy.for_host("n", {"ipvs_host_class": "k8s_node"})
    ftp = policy.for_host("f", {"ipvs_host_class": "ftp"})
    clean = usage([])
    with_ftp = usage(["## ipvsadm", "TCP  10.0.0.1:21 rr"])
    drop = "-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP"
    with_drop = usage(["## iptables", drop])
    mark = "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000"
    kube_proxy = usage(
        [
            "## iptables",
            "*nat",
            "-A PREROUTING -j KUBE-SERVICES",
            mark,
            "COMMIT",
            "*filter",
            drop,
            "COMMIT",
        ]
    )
    assert interlock(k8s, clean, "prekill") is None
    assert "ftp" in (interlock(k8s, with_ftp, "prekill") or "")
    assert interlock(ftp, with_ftp, "prekill") is None  # knob 0: nothing to refuse
    # prekill kills the stale entry before conntrack: safe under every ruleset shape
    assert interlock(k8s, with_drop, "prekill") is None
    assert interlock(k8s, kube_proxy, "prekill") is None
    # no declared design (the test-only `nodesign` build, the seed's semantics): refused
    # under the INVALID drop and under nat rules, naming the rule
    why = interlock(k8s, with_drop, None) or ""
    assert "'none'" in why and drop in why, why
    why = interlock(k8s, usage(["## iptables", "*nat", mark, "COMMIT"]), "none") or ""
    assert "'none'" in why and mark in why, why
    # a design this release does not know (2.x's handback, 1.x's re-track) counts as unknown
    for old in ("handback", "consistent"):
        assert drop in (interlock(k8s, with_drop, old) or ""), old
    allowed = policy.for_host(
        "n", {"ipvs_host_class": "k8s_node", "ipvs_allow_reuse_with": "FTP is active mode only"}
    )
    assert interlock(allowed, with_ftp, "prekill") is None


def test_nat_rule_found_in_iptables_save_and_nft():
    assert usage([])["nat_rule"] is None
    filter_only = usage(["## iptables", "*filter", "-A FORWARD -j ACCEPT", "COMMIT"])
    assert filter_only["nat_rule"] is None
    nat = usage(
        [
            "## iptables",
            "*nat",
            "-A PREROUTING -j KUBE-SERVICES",
            "-A KUBE-POSTROUTING -j MASQUERADE --random-fully",
            "COMMIT",
        ]
    )
    assert nat["nat_rule"] == "-A KUBE-POSTROUTING -j MASQUERADE --random-fully"
    nft = usage(
        [
            "## nft",
            "table ip filter {",
            "\tchain input {",
            "\t\ttype filter hook input priority filter; policy accept;",
            "\t\tct state invalid drop",
            "\t}",
            "}",
            "table ip kube {",
            "\tchain post {",
            "\t\ttype nat hook postrouting priority srcnat; policy accept;",
            "\t\tmeta mark & 0x4000 == 0x4000 masquerade",
            "\t}",
            "}",
        ]
    )
    assert nft["nat_rule"] == "meta mark & 0x4000 == 0x4000 masquerade"
    assert nft["invalid_drop_rule"] == "ct state invalid drop"


READY = ["dkms=yes", "running=6.1.192-2", "headers=6.1.192-2", "build=yes"]
KR = "6.1.0-56-cloud-amd64"
NO_USE = {"ftp": False, "connmark": False, "invalid_drop": False}
NO_LOCK = {"lockdown": "none", "secure_boot": False, "sig_enforce": False}


def test_dkms_ready_names_what_is_missing_with_the_version_to_install():
    # headers only: no linux-source is asked for
    assert dkms_problems(DkmsReady().process(READY), KR) == []
    assert "linux-source" not in str(DkmsReady().command(KR))
    bare = DkmsReady().process(["dkms=no", "missing=gcc", "running=6.1.192-2", "headers="])
    assert dkms_problems(bare, KR) == [
        "dkms is not installed",
        "missing build tools: gcc",
        f"linux-headers-{KR}=6.1.192-2 is not installed",
    ]
    drift = DkmsReady().process([*READY, "headers=6.1.190-1"])
    assert dkms_problems(drift, KR) == [
        f"linux-headers-{KR} is 6.1.190-1, the running kernel is 6.1.192-2"
    ]
    no_build_dir = DkmsReady().process([r for r in READY if r != "build=yes"])
    assert dkms_problems(no_build_dir, KR) == [f"linux-headers-{KR}=6.1.192-2 is not installed"]


def test_installed_set_reads_each_module_set_id():
    out = [
        *modinfo("ip_vs_reuse", "3.0+abc", "A", "3.0+abc", "prekill"),
        *modinfo("other", "", "C", ""),
    ]
    assert IpvsInstalledSet().process(out) == {"ip_vs_reuse.ko": "3.0+abc", "other.ko": ""}
    assert IpvsInstalledSet().process(["depmod-missing", *out]) == {}


def test_build_mode_plan_uploads_the_dkms_tree_of_the_fix_module(tmp_path, monkeypatch):
    monkeypatch.setattr(dkms, "CACHE", tmp_path)
    data = {"ipvs_host_class": "k8s_node", "ipvs_install": "dkms"}
    plan = decide("n", data, KR, NO_LOCK, NO_USE, dkms_ready=DkmsReady().process(READY))
    assert plan.build_on_host and plan.reuse == "prekill"
    assert plan.modules == {"ip_vs_reuse.ko": ""}
    assert plan.patchset == kernel.set_id(kernel.module_sources())
    assert plan.tarball.startswith(str(tmp_path)) and plan.tarball.endswith(".tar.gz")
    assert len(plan.tarball_sha256) == 64


def test_build_mode_refusals_name_host_and_reason():
    data = {"ipvs_host_class": "k8s_node", "ipvs_install": "dkms"}
    with pytest.raises(FleetError, match=rf"host n \(kernel {KR}\): ipvs_install=dkms: dkms is"):
        decide("n", data, KR, NO_LOCK, NO_USE, dkms_ready=DkmsReady().process(["dkms=no"]))
    # An engine that reads no DKMS facts (the Ansible role) says it does not build.
    with pytest.raises(FleetError, match="done by the pyinfra deploy"):
        decide("n", data, KR, NO_LOCK, NO_USE)
    with pytest.raises(ConfigError, match="host n: ipvs_install: 'source' is not one of"):
        decide("n", {**data, "ipvs_install": "source"}, KR, NO_LOCK, NO_USE)


class _State:
    def __init__(self) -> None:
        self.failed_hosts: set[object] = set()

    def fail_hosts(self, hosts: set[object]) -> None:
        self.failed_hosts |= hosts


class _Host:
    name = "h1"

    def __init__(self) -> None:
        self.state = _State()


def test_a_host_lost_while_its_facts_are_read_fails_alone():
    h = _Host()
    assert read_facts(h, lambda: "6.1.0-56-cloud-amd64") == "6.1.0-56-cloud-amd64"  # type: ignore[arg-type]
    assert not h.state.failed_hosts

    def lost() -> str:
        raise EOFError()

    assert read_facts(h, lost) is None  # type: ignore[arg-type]
    assert h.state.failed_hosts == {h}

    # pyinfra caught the SSH error itself, failed the host and returned the fact's default.
    h2 = _Host()

    def failed_by_pyinfra() -> None:
        h2.state.fail_hosts({h2})

    assert read_facts(h2, failed_by_pyinfra) is None  # type: ignore[arg-type]

    def bug() -> str:
        raise KeyError("not a connection problem")

    with pytest.raises(KeyError):  # anything else still aborts the run
        read_facts(_Host(), bug)  # type: ignore[arg-type]


def test_managed_file_reads_record_and_file_in_one_command():
    from ipvs_fleet.deploy.facts import ManagedFile

    f = ManagedFile()
    cmd = f.command("/etc/sysctl.d/90-ipvs-fleet.conf", "/var/lib/ipvs-fleet/backup/x")
    assert cmd.startswith("f=/etc/sysctl.d/90-ipvs-fleet.conf; b=/var/lib/ipvs-fleet/backup/x;")
    assert f.process(["backup=yes", "exists=yes", "mode=644 sha256=ab12"]) == {
        "backup": True,
        "absent": False,
        "exists": True,
        "mode": "644",
        "sha256": "ab12",
    }
    # a symlink or folder in its place: it exists, and no mode or sum is compared equal
    assert f.process(["absent=yes", "exists=yes"]) == {
        "backup": False,
        "absent": True,
        "exists": True,
        "mode": None,
        "sha256": None,
    }
    assert f.default() == {
        "backup": False,
        "absent": False,
        "exists": False,
        "mode": None,
        "sha256": None,
    }
