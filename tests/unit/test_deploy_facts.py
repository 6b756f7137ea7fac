"""Parsing of the deploy's facts and the reuse interlock (pure logic; the lab tests run them
against real hosts)."""

from __future__ import annotations

import pytest

from ipvs_fleet.deploy.facts import (
    DkmsReady,
    IpvsInstalledModules,
    IpvsInstalledSet,
    IpvsLoadedModules,
    IpvsSwapRecord,
    IpvsSysctls,
    IpvsUsage,
    Lockdown,
    dkms_problems,
    refuses_unsigned,
    swap_record_problems,
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
            "loaded|ip_vs|1.0+abc|-|OE",
            "loaded|ip_vs_rr|-|DEF|-",  # stock rr, our rr installed
            "loaded|ip_vs_sh|1.0+old|-|OE",  # an older patched build loaded
            "loaded|xt_ipvs|-|-|-",  # not installed by us
            *modinfo("ip_vs", "1.0+abc", "AAA", "1.0+abc", "handback"),
            *modinfo("ip_vs_rr", "1.0+abc", "XYZ", "1.0+abc"),
            *modinfo("ip_vs_sh", "1.0+abc", "SSS", "1.0+abc"),
        ]
    )
    assert out["ip_vs"] == {
        "version": "1.0+abc",
        "srcversion": None,
        "taint": "OE",
        "patched": True,
        "patchset": "1.0+abc",
        "reuse": "handback",
    }
    assert out["ip_vs_rr"]["patched"] is False and out["ip_vs_rr"]["patchset"] is None
    assert out["ip_vs_sh"]["patched"] is False
    assert out["xt_ipvs"] == {"version": None, "srcversion": None, "taint": "",
                              "patched": False, "patchset": None, "reuse": None}  # fmt: skip


def test_loaded_modules_match_by_srcversion_and_ignore_files_of_unloaded_modules():
    out = IpvsLoadedModules().process(
        ["loaded|ip_vs|-|AAA|OE", *modinfo("ip_vs", "", "AAA", "1.0+abc"),
         *modinfo("ip_vs_wrr", "1.0+abc", "W", "1.0+abc")]
    )  # fmt: skip
    assert list(out) == ["ip_vs"]
    assert out["ip_vs"]["patched"] is True and out["ip_vs"]["reuse"] is None


def test_installed_modules():
    lines = [f"{SHA}  ip_vs.ko", f"{'b' * 64} *ip_vs_rr.ko", "garbage"]
    assert IpvsInstalledModules().process(lines) == {"ip_vs.ko": SHA, "ip_vs_rr.ko": "b" * 64}
    # files in place but depmod never ran (install cut off): not installed, so redo it
    assert IpvsInstalledModules().process(["depmod-missing", *lines]) == {}


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
    kube_proxy = usage(["## iptables", "*nat", "-A PREROUTING -j KUBE-SERVICES", mark,
                        "COMMIT", "*filter", drop, "COMMIT"])
    assert interlock(k8s, clean, "handback") is None
    assert "ftp" in (interlock(k8s, with_ftp, "handback") or "")
    assert interlock(ftp, with_ftp, "handback") is None  # knob 0: nothing to refuse
    assert interlock(k8s, with_drop, "handback") is None
    assert interlock(k8s, kube_proxy, "handback") is None
    # the 1.x re-track design: fine with an INVALID drop alone, refused under nat rules,
    # naming the rule with a side effect
    assert interlock(k8s, with_drop, "consistent") is None
    why = interlock(k8s, kube_proxy, "consistent") or ""
    assert "reuse design is 'consistent'" in why and mark in why, why
    # no declared design (the seed's semantics): refused under the INVALID drop
    why = interlock(k8s, with_drop, None) or ""
    assert "'none'" in why and drop in why, why
    allowed = policy.for_host(
        "n", {"ipvs_host_class": "k8s_node", "ipvs_allow_reuse_with": "FTP is active mode only"}
    )
    assert interlock(allowed, with_ftp, "handback") is None


def test_nat_rule_found_in_iptables_save_and_nft():
    assert usage([])["nat_rule"] is None
    filter_only = usage(["## iptables", "*filter", "-A FORWARD -j ACCEPT", "COMMIT"])
    assert filter_only["nat_rule"] is None
    nat = usage(["## iptables", "*nat", "-A PREROUTING -j KUBE-SERVICES",
                 "-A KUBE-POSTROUTING -j MASQUERADE --random-fully", "COMMIT"])
    assert nat["nat_rule"] == "-A KUBE-POSTROUTING -j MASQUERADE --random-fully"
    nft = usage(["## nft", "table ip filter {", "\tchain input {",
                 "\t\ttype filter hook input priority filter; policy accept;",
                 "\t\tct state invalid drop", "\t}", "}",
                 "table ip kube {", "\tchain post {",
                 "\t\ttype nat hook postrouting priority srcnat; policy accept;",
                 "\t\tmeta mark & 0x4000 == 0x4000 masquerade", "\t}", "}"])
    assert nft["nat_rule"] == "meta mark & 0x4000 == 0x4000 masquerade"
    assert nft["invalid_drop_rule"] == "ct state invalid drop"


READY = [
    "dkms=yes", "running=6.1.192-2", "headers=6.1.192-2", "source=6.1.192-2",
    "source_tar=yes", "build=yes",
]  # fmt: skip
KR = "6.1.0-56-cloud-amd64"
NO_USE = {"ftp": False, "connmark": False, "invalid_drop": False}
NO_LOCK = {"lockdown": "none", "secure_boot": False, "sig_enforce": False}


def test_dkms_ready_names_what_is_missing_with_the_version_to_install():
    assert dkms_problems(DkmsReady().process(READY), KR, "6.1") == []
    bare = DkmsReady().process(["dkms=no", "missing=gcc", "running=6.1.192-2", "headers=",
                                "source="])  # fmt: skip
    assert dkms_problems(bare, KR, "6.1") == [
        "dkms is not installed",
        "missing build tools: gcc",
        f"linux-headers-{KR}=6.1.192-2 is not installed",
        "linux-source-6.1=6.1.192-2 is not installed",
    ]
    drift = DkmsReady().process([*READY, "source=6.1.190-1"])
    assert dkms_problems(drift, KR, "6.1") == [
        "linux-source-6.1 is 6.1.190-1, the running kernel is 6.1.192-2"
    ]


def test_installed_set_reads_each_module_set_id():
    out = [*modinfo("ip_vs", "1.0+abc", "A", "1.0+abc", "handback"),
           *modinfo("ip_vs_rr", "1.0+abc", "B", "1.0+abc"),
           *modinfo("xt_ipvs", "", "C", "")]  # fmt: skip
    assert IpvsInstalledSet().process(out) == {
        "ip_vs.ko": "1.0+abc", "ip_vs_rr.ko": "1.0+abc", "xt_ipvs.ko": ""
    }  # fmt: skip
    assert IpvsInstalledSet().process(["depmod-missing", *out]) == {}


def test_build_mode_plan_uploads_the_dkms_tree_of_the_kernel_line():
    data = {"ipvs_host_class": "k8s_node", "ipvs_install": "dkms"}
    plan = decide("n", data, KR, NO_LOCK, NO_USE, dkms_ready=DkmsReady().process(READY))
    assert plan.build_on_host and plan.reuse == "handback"
    assert "ip_vs.ko" in plan.modules and len(plan.modules) == 17
    assert plan.tarball.endswith(".tar.gz") and len(plan.tarball_sha256) == 64


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


RECORD = ["present=yes", "age=40", "services=3", "real_servers=8"]


def test_swap_record_lists_what_changed_since_the_swap_restored_the_table():
    rec = IpvsSwapRecord().process([
        *RECORD,
        "restored -A -t 10.96.0.10:53 -s rr",
        "restored -a -t 10.96.0.10:53 -r 10.244.1.7:53 -m -w 1",
        "restored #timeouts 900 120 301",
        "live -A -t 10.96.0.10:53 -s rr",
        "live -a -t 10.96.0.10:53 -r 10.244.1.7:53 -m -w 5",
        "live #timeouts 900 120 300",
        "compared=yes",
    ])  # fmt: skip
    assert rec["present"] and rec["compared"] and (rec["age"], rec["services"]) == (40, 3)
    assert rec["missing"] == ["-a -t 10.96.0.10:53 -r 10.244.1.7:53 -m -w 1",
                              "#timeouts 900 120 301"]  # fmt: skip
    assert rec["extra"][1] == "#timeouts 900 120 300"
    # Within the step's time the differences fail the host; an older record only informs.
    assert swap_record_problems(rec, 60) == [
        "not live, though the swap 40 s ago restored it: -a -t 10.96.0.10:53 -r 10.244.1.7:53 "
        "-m -w 1",
        "not live, though the swap 40 s ago restored it: #timeouts 900 120 301",
        "live, though not in the swap's record: -a -t 10.96.0.10:53 -r 10.244.1.7:53 -m -w 5",
        "live, though not in the swap's record: #timeouts 900 120 300",
    ]
    assert swap_record_problems(rec, 39) == []
    assert swap_record_problems(rec, None) == []


def test_swap_record_absent_or_not_comparable():
    assert IpvsSwapRecord().process(["present=no"])["present"] is False
    assert swap_record_problems(IpvsSwapRecord().process(["present=no"]), 60) == []
    old = IpvsSwapRecord().process([*RECORD, "compared=unsupported"])
    assert swap_record_problems(old, 60) == [
        "the live IPVS table could not be compared with /var/lib/ipvs-fleet/swap.last/restored "
        "(unsupported)"
    ]
    same = IpvsSwapRecord().process([*RECORD, "restored -A -t 10.0.0.1:80 -s rr",
                                     "live -A -t 10.0.0.1:80 -s rr", "compared=yes"])  # fmt: skip
    assert swap_record_problems(same, 60) == []


def test_managed_file_reads_record_and_file_in_one_command():
    from ipvs_fleet.deploy.facts import ManagedFile

    f = ManagedFile()
    cmd = f.command("/etc/sysctl.d/90-ipvs-fleet.conf", "/var/lib/ipvs-fleet/backup/x")
    assert cmd.startswith("f=/etc/sysctl.d/90-ipvs-fleet.conf; b=/var/lib/ipvs-fleet/backup/x;")
    assert f.process(["backup=yes", "exists=yes", "mode=644 sha1=ab12"]) == {
        "backup": True, "absent": False, "exists": True, "mode": "644", "sha1": "ab12"}  # fmt: skip
    # a symlink or folder in its place: it exists, and no mode or sum is compared equal
    assert f.process(["absent=yes", "exists=yes"]) == {
        "backup": False, "absent": True, "exists": True, "mode": None, "sha1": None}  # fmt: skip
    assert f.default() == {
        "backup": False, "absent": False, "exists": False, "mode": None, "sha1": None}  # fmt: skip
