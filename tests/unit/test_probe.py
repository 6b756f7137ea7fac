"""The probe's pure parts, and the probe against its identity server on loopback."""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipvs_fleet.errors import FleetError
from ipvs_fleet.probe import cells, kernel, modules, probe, scenarios
from ipvs_fleet.probe.cli import parse_counts, parse_sysctls
from ipvs_fleet.probe.harness import (
    Plan,
    cell_label,
    check_fix_loaded,
    modules_label,
    summarize,
)

PROBE_DIR = Path(probe.__file__).parent
K8S_BUDGET = {"slow_ms": 900, "max_slow": 0, "max_errors": 0, "p99_ms": 100}


def test_percentile_nearest_rank() -> None:
    vals = [float(x) for x in range(1, 101)]
    assert probe.percentile(vals, 50) == 50
    assert probe.percentile(vals, 99) == 99
    assert probe.percentile(vals, 100) == 100
    assert probe.percentile([7.0], 99) == 7.0
    assert probe.percentile([], 50) is None
    assert probe.summarize([1.0, 3.0])["mean"] == 2.0


def test_parse_netstat_reads_tcpext() -> None:
    lines = [
        "TcpExt: SyncookiesSent TCPSynRetrans",
        "TcpExt: 0 17",
        "IpExt: InNoRoutes",
        "IpExt: 4",
    ]
    assert probe.parse_netstat(lines) == {
        "TcpExt": {"SyncookiesSent": 0, "TCPSynRetrans": 17},
        "IpExt": {"InNoRoutes": 4},
    }
    assert isinstance(probe.syn_retrans(), int)  # the controller's own netns
    assert probe.syn_retrans("/nonexistent") is None


def _result(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {
        "count": 100,
        "ok": 100,
        "errors": 0,
        "error_kinds": {},
        "slow": 0,
        "slow_ms": 900.0,
        "latency_ms": {"p99": 8.0},
        "attempts": [],
    }
    base.update(kw)
    return base


def test_budget_met() -> None:
    assert probe.evaluate_budget(_result(), K8S_BUDGET) == []


def test_budget_violations_name_expected_and_actual() -> None:
    r = _result(slow=3, errors=2, error_kinds={"connect: timeout": 2}, latency_ms={"p99": 1020})
    v = probe.evaluate_budget(r, K8S_BUDGET)
    assert v == [
        "3 connects at or above 900 ms (allowed 0)",
        "2 failed connections (allowed 0) [connect: timeout: 2]",
        "p99 1020.0 ms above 100 ms",
    ]


def test_budget_null_limits_are_not_budgeted() -> None:
    ftp = {"slow_ms": 900, "max_slow": None, "max_errors": 0, "p99_ms": None}
    assert probe.evaluate_budget(_result(slow=50, latency_ms={"p99": 1020}), ftp) == []
    assert probe.evaluate_budget(_result(count=0), ftp) == ["no connection attempted"]


def test_budget_recounts_with_its_own_threshold() -> None:
    attempts = [{"connect_ms": ms} for ms in (5.0, 600.0, 950.0)]
    r = _result(count=3, slow=1, attempts=attempts)
    assert probe.evaluate_budget(r, {**K8S_BUDGET, "slow_ms": 500}) == [
        "2 connects at or above 500 ms (allowed 0)"
    ]


def test_split_target() -> None:
    assert probe.split_target("10.10.9.1:8080") == ("10.10.9.1", 8080)
    for bad in ("10.10.9.1", ":80", "h:0", "h:x"):
        with pytest.raises(ValueError):
            probe.split_target(bad)


@pytest.fixture
def identity_server() -> Iterator[int]:
    srv = probe.IdentityServer(("127.0.0.1", 0), "rs-test", hold=1.0)
    port = srv.lsock.getsockname()[1]
    t = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    t.start()
    yield port
    srv.stop()
    t.join(5)
    srv.close()


@pytest.mark.parametrize("mode", ["fin", "rst"])
def test_probe_reuses_one_source_port(identity_server: int, mode: str) -> None:
    r = probe.run_probe("127.0.0.1", identity_server, 50, src_ip="127.0.0.1", mode=mode)
    assert (r["count"], r["ok"], r["errors"], r["slow"]) == (50, 50, 0, 0)
    assert r["servers"] == {"rs-test": 50}
    assert {a["src_port"] for a in r["attempts"]} == {r["src_port"]}
    assert r["latency_ms"]["p99"] < 900
    json.dumps(r)


def test_probe_ephemeral_ports(identity_server: int) -> None:
    r = probe.run_probe("127.0.0.1", identity_server, 20, reuse=False, with_attempts=False)
    assert r["ok"] == 20 and "attempts" not in r and r["src_port"] is None


def test_probe_counts_refused_connects_as_errors() -> None:
    port = probe.pick_port("127.0.0.1")  # nothing listens there
    r = probe.run_probe("127.0.0.1", port, 3, timeout=1)
    assert r["errors"] == 3 and r["error_kinds"] == {"connect: ECONNREFUSED": 3}
    assert probe.evaluate_budget(r, K8S_BUDGET)[0].startswith("3 failed connections")


def test_probe_is_bounded_in_time(identity_server: int) -> None:
    r = probe.run_probe("127.0.0.1", identity_server, 100_000, deadline=0.2)
    assert r["count"] < 100_000 and "deadline" in r["stopped"]
    with pytest.raises(ValueError):
        probe.run_probe("127.0.0.1", identity_server, 100_001)


def test_hold_then_client_rst(identity_server: int) -> None:
    a = probe.connect_once("127.0.0.1", identity_server, mode="hold", close="rst")
    assert a.error is None and a.server == "rs-test"


CT_LINES = """\
tcp      6 117 TIME_WAIT src=10.10.1.2 dst=10.10.9.1 sport=10001 dport=8080 \
src=10.10.3.2 dst=10.10.1.2 sport=8080 dport=10001 [ASSURED] mark=0 use=1
ipv4     2 tcp      6 9 CLOSE src=10.10.1.2 dst=10.10.9.1 sport=10002 dport=8080 \
src=10.10.2.2 dst=10.10.1.2 sport=8080 dport=10002 mark=0 zone=0 use=2
tcp      6 431999 ESTABLISHED src=10.10.1.2 dst=10.10.3.2 sport=10002 dport=8080 \
src=10.10.3.2 dst=10.10.1.2 sport=8080 dport=10002 [ASSURED] mark=0 use=1
udp      17 29 src=10.0.2.15 dst=10.0.2.3 sport=5353 dport=53 src=10.0.2.3 dst=10.0.2.15
"""


def test_parse_conntrack_lines() -> None:
    entries = kernel.parse_conntrack(CT_LINES)
    assert len(entries) == 3
    assert entries[0]["state"] == "TIME_WAIT" and entries[0]["flags"] == ["ASSURED"]
    assert entries[1]["orig"]["sport"] == "10002" and entries[1]["reply"]["src"] == "10.10.2.2"


# /proc/net/ip_vs_conn as 7.2 prints it (6.12 the same columns): ports in hex
IPVS_CONN = """\
Pro FromIP   FPrt ToIP     TPrt DestIP   DPrt State       Expires PEName PEData
TCP 0A0A0102 2710 0A0A0901 1F90 0A0A0202 1F90 ESTABLISHED     899
UDP 0A0A0102 2710 0A0A0901 0035 0A0A0302 0035 UDP             298
TCP 0A0A0102 2711 0A0A0901 1F90 0A0A0302 1F90 TIME_WAIT         1
"""


def test_ipvs_conns_from_port_counts_tcp_rows_of_that_client_port() -> None:
    assert kernel.ipvs_conns_from_port(IPVS_CONN, 10000) == 1  # the UDP row is not counted
    assert kernel.ipvs_conns_from_port(IPVS_CONN, 10001) == 1
    assert kernel.ipvs_conns_from_port(IPVS_CONN, 10002) == 0
    assert kernel.ipvs_conns_from_port(IPVS_CONN.splitlines()[0], 10000) == 0


def test_ipvs_conns_from_port_of_udp() -> None:
    assert kernel.ipvs_conns_from_port(IPVS_CONN, 10000, "udp") == 1
    assert kernel.ipvs_conns_from_port(IPVS_CONN, 10001, "udp") == 0


# --- the fix module: its counters, loading and restoring -------------------------------------

# /proc/net/ip_vs_reuse as ip_vs_reuse.c's ip_vs_reuse_show prints it
REUSE_PROC = "enabled 1\nkilled_tcp 7\nkilled_udp 2\n"


def test_parse_reuse_counters() -> None:
    assert modules.parse_reuse_counters(REUSE_PROC) == {
        "enabled": 1,
        "killed_tcp": 7,
        "killed_udp": 2,
    }
    # the file is absent (stock): read_text gives ""
    assert modules.parse_reuse_counters("") is None
    assert modules.parse_reuse_counters("garbage\n") is None


def test_killed_delta() -> None:
    before = modules.parse_reuse_counters(REUSE_PROC)
    after = modules.parse_reuse_counters("enabled 1\nkilled_tcp 37\nkilled_udp 2\n")
    assert modules.killed_delta(before, after) == {"killed_tcp": 30, "killed_udp": 0}
    # stock: no file, no number (not 0: nothing could have been killed)
    assert modules.killed_delta(None, None) == {"killed_tcp": None, "killed_udp": None}
    assert modules.killed_delta(before, None) == {"killed_tcp": None, "killed_udp": None}
    assert modules.killed_delta({"enabled": 0}, {"enabled": 0}) == {
        "killed_tcp": None,
        "killed_udp": None,
    }


STOCK_TAINTS = {"ip_vs": "", "ip_vs_rr": "", "ip_vs_ftp": ""}
HOST_MODULES = ["ip_vs", "ip_vs_rr", "ip_vs_wrr", "ip_vs_sh", "ip_vs_reuse"]
KERNEL_TREES: dict[str, str | None] = {
    **dict.fromkeys(["ip_vs", "ip_vs_rr", "ip_vs_wrr", "ip_vs_sh", "ip_vs_ftp"], "kernel"),
    "ip_vs_reuse": "other",
}


def test_foreign_ipvs_names_patched_builds_not_the_fix() -> None:
    assert modules.foreign_ipvs({**STOCK_TAINTS, "ip_vs_reuse": "OE"}) == []
    assert modules.foreign_ipvs({"ip_vs": "OE", "ip_vs_rr": "OE", "ip_vs_reuse": "OE"}) == [
        "ip_vs",
        "ip_vs_rr",
    ]


def test_restore_after_the_fix_from_a_folder_keeps_ipvs_loaded() -> None:
    # the probe's state: stock ip_vs, rr, ftp and ip_vs_reuse from a folder (not the
    # installed build): ftp goes, ip_vs_reuse is swapped for the installed one
    taints = {**STOCK_TAINTS, "ip_vs_reuse": "OE"}
    steps = modules.restore_steps(taints, KERNEL_TREES, HOST_MODULES, fix_installed=False)
    assert steps == modules.RestoreSteps(
        False, ["ip_vs_ftp", "ip_vs_reuse"], ["ip_vs_wrr", "ip_vs_sh", "ip_vs_reuse"]
    )


def test_restore_keeps_the_installed_fix_module() -> None:
    taints = {**STOCK_TAINTS, "ip_vs_wrr": "", "ip_vs_sh": "", "ip_vs_reuse": "OE"}
    steps = modules.restore_steps(taints, KERNEL_TREES, HOST_MODULES, fix_installed=True)
    assert steps == modules.RestoreSteps(False, ["ip_vs_ftp"], [])


def test_restore_after_stock_loads_the_fix_module_back() -> None:
    steps = modules.restore_steps(STOCK_TAINTS, KERNEL_TREES, HOST_MODULES, False)
    assert steps == modules.RestoreSteps(
        False, ["ip_vs_ftp"], ["ip_vs_wrr", "ip_vs_sh", "ip_vs_reuse"]
    )


def test_restore_unloads_the_stack_only_for_a_build_not_the_hosts() -> None:
    # a patched set the probe loaded (the upstream variant) on a host with stock IPVS
    patched = {"ip_vs": "OE", "ip_vs_rr": "OE", "ip_vs_ftp": "OE"}
    steps = modules.restore_steps(patched, KERNEL_TREES, HOST_MODULES, False)
    assert steps == modules.RestoreSteps(True, [], HOST_MODULES)
    # stock modules the probe loaded on a host whose own set is patched (2.x, in updates/)
    trees = {**KERNEL_TREES, "ip_vs": "other", "ip_vs_rr": "other"}
    steps = modules.restore_steps(STOCK_TAINTS, trees, ["ip_vs", "ip_vs_rr"], False)
    assert steps == modules.RestoreSteps(True, [], ["ip_vs", "ip_vs_rr"])
    # a host without IPVS before
    assert modules.restore_steps(STOCK_TAINTS, KERNEL_TREES, [], False).unload_all
    # ip_vs first, whatever order the status listed
    assert modules.restore_steps({}, KERNEL_TREES, ["ip_vs_rr", "ip_vs"], False).load == [
        "ip_vs",
        "ip_vs_rr",
    ]


def test_record_holds_only_while_it_describes_what_is_loaded() -> None:
    fix = {"module": "ip_vs_reuse", "srcversion": "ABC"}
    loaded = ["ip_vs", "ip_vs_rr", "ip_vs_reuse"]
    assert modules.record_holds(fix, loaded, "ABC")
    assert not modules.record_holds(fix, loaded, "DEF")  # reloaded (the installed build)
    assert not modules.record_holds(fix, ["ip_vs"], None)
    stock = {"module": None}
    assert modules.record_holds(stock, ["ip_vs", "ip_vs_rr"], None)
    assert not modules.record_holds(stock, loaded, "ABC")  # the fix came back since
    assert modules.record_holds({"module": "ip_vs"}, ["ip_vs"], None)  # a patched set
    assert not modules.record_holds({"module": "ip_vs"}, [], None)
    assert not modules.record_holds(None, loaded, "ABC")


def test_check_fix_loaded() -> None:
    st = {
        "loaded": ["ip_vs", "ip_vs_reuse"],
        "knob_present": True,
        "loaded_by_probe": {"module": "ip_vs_reuse", "set_id": "3.0+abc"},
    }
    check_fix_loaded("h", st, "3.0+abc")
    with pytest.raises(FleetError, match="of set 3.0\\+abc, the artifact's is 3.0\\+def"):
        check_fix_loaded("h", st, "3.0+def")
    with pytest.raises(FleetError, match="ip_vs_reuse is not loaded .*loaded: ip_vs\\)"):
        check_fix_loaded("h", {"loaded": ["ip_vs"], "knob_present": False}, "3.0+abc")


def test_conntrack_view_consistent_after_reuse() -> None:
    v = kernel.conntrack_view(kernel.parse_conntrack(CT_LINES), "10.10.1.2", 10001, "10.10.3.2")
    assert v["consistent"] and len(v["entries"]) == 1


def test_conntrack_view_catches_the_seed_semantics() -> None:
    # Two entries for one connection, the old one still naming the old real server.
    v = kernel.conntrack_view(kernel.parse_conntrack(CT_LINES), "10.10.1.2", 10002, "10.10.3.2")
    assert not v["consistent"] and len(v["entries"]) == 2
    # One entry, but its reply side on the old real server: also inconsistent.
    one = kernel.parse_conntrack(CT_LINES.splitlines()[1])
    assert not kernel.conntrack_view(one, "10.10.1.2", 10002, "10.10.3.2")["consistent"]


def test_kernel_warnings_filter() -> None:
    lines = [
        "[ 1.0] ip_vs: loading out-of-tree module taints kernel.",
        "[ 2.0] WARNING: CPU: 0 PID: 1 at net/netfilter/ipvs/ip_vs_core.c:2100",
        "[ 2.1] Call Trace:",
    ]
    assert kernel.kernel_warnings(lines) == lines[1:]


def test_plan_validation_and_counts() -> None:
    assert parse_counts("A=200, B=10") == {"A": 200, "B": 10}
    assert parse_sysctls(["conn_lfactor=4", "conn_max=-1"]) == {"conn_lfactor": 4, "conn_max": -1}
    for bad in ("conn_lfactor", "conn_lfactor=x"):
        with pytest.raises(FleetError, match="is not NAME=INT"):
            parse_sysctls([bad])
    with pytest.raises(FleetError):
        Plan(scenarios={"Z": 1})
    with pytest.raises(FleetError):
        Plan(rule="reject")
    with pytest.raises(FleetError):
        Plan(knob=2)
    assert Plan(scenarios={"A": 10}).estimate_s(slow=True) > 10


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"ruleset": "cilium"}, "ruleset must be one of minimal, kube-proxy"),
        ({"iptables": "xtables"}, "iptables must be one of nft, legacy"),
        ({"client": "remote"}, "client must be one of outside, pod, host"),
        ({"family": 5}, "family must be one of 4, 6"),
        ({"ftp": True, "ruleset": "kube-proxy"}, "ftp runs only with ruleset minimal"),
        ({"ftp": True, "family": 6}, "ftp runs only with ruleset minimal"),
        ({"settle": -1.0}, "settle must be 0..30"),
        ({"scenarios": {"A": -3}}, "attempts must be a count"),
        ({"ipvs_sysctls": {"conn_reuse_old_conntrack": 1}}, "not an IPVS sysctl name"),
        ({"ipvs_sysctls": {"../../kernel/x": 1}}, "not an IPVS sysctl name"),
        ({"ipvs_sysctls": {"conn_lfactor": "4"}}, "conn_lfactor must be an integer"),
        ({"ipvs_sysctls": {"conn_lfactor": True}}, "conn_lfactor must be an integer"),
    ],
)
def test_plan_rejects_unknown_cells_clearly(kw: dict[str, object], message: str) -> None:
    with pytest.raises(FleetError, match=message):
        Plan(**kw)  # type: ignore[arg-type]


def test_plan_defaults_are_the_minimal_cell() -> None:
    p = Plan()
    assert (p.ruleset, p.iptables, p.client, p.family, p.rule, p.settle) == (
        "minimal",
        "nft",
        "outside",
        4,
        "drop",
        0.0,
    )
    Plan(ruleset="calico", iptables="legacy", client="host", family=6, scenarios={"U": 3})


def test_plan_masquerade_demanded_per_cell() -> None:
    assert not Plan().masquerade_demanded
    assert not Plan(client="host").masquerade_demanded  # minimal: no masquerade at all
    assert Plan(ruleset="kube-proxy", client="outside").masquerade_demanded
    assert Plan(ruleset="kube-proxy", client="host").masquerade_demanded
    assert not Plan(ruleset="kube-proxy", client="pod").masquerade_demanded
    assert not Plan(ruleset="calico", client="pod").masquerade_demanded
    assert Plan(ruleset="kube-proxy-masq-all", client="pod").masquerade_demanded


def test_plan_estimate_covers_udp_settle_and_failures() -> None:
    base = Plan(scenarios={"A": 10}).estimate_s(slow=True)
    assert Plan(scenarios={"A": 10, "U": 10}).estimate_s(slow=True) >= base + 10 * 2
    assert Plan(scenarios={"B2": 10}, settle=1.0).estimate_s(slow=True) >= 10 * (1.2 + 1.0)
    assert Plan(ruleset="calico", scenarios={"A": 10}).estimate_s(slow=True) > base
    assert Plan(conntrack_check=True).estimate_s(slow=False) > Plan().estimate_s(slow=False)


def test_parse_identity_long_and_bare() -> None:
    assert probe.parse_identity("rs1") == ("rs1", {})
    assert probe.parse_identity("rs2 peer=fd00:10:244:1::1 pport=40312 req=q2") == (
        "rs2",
        {"peer": "fd00:10:244:1::1", "pport": "40312", "req": "q2"},
    )
    assert probe.parse_identity("") == ("", {})


def test_identity_server_reports_the_peer_only_when_asked(identity_server: int) -> None:
    bare = probe.connect_once("127.0.0.1", identity_server, mode="rst")
    assert (bare.server, bare.peer, bare.peer_port) == ("rs-test", None, None)
    a = probe.connect_once(
        "127.0.0.1",
        identity_server,
        mode="rst",
        peer=True,
        src=("127.0.0.1", probe.pick_port("127.0.0.1")),
    )
    assert a.error is None and a.server == "rs-test"
    assert a.peer == "127.0.0.1" and a.peer_port == a.src_port
    # the first word is the mode: `rst peer` still aborts (the client sees the reset)
    h = probe.connect_once("127.0.0.1", identity_server, mode="hold", close="rst", peer=True)
    assert h.error is None and h.peer == "127.0.0.1"


def test_identity_server_answers_udp_with_peer_and_request() -> None:
    import socket

    srv = probe.IdentityServer(("127.0.0.1", 0), "rs-udp", hold=1.0, udp_port=0)
    assert srv.usock is not None
    uport = srv.usock.getsockname()[1]
    t = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    t.start()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
            c.settimeout(5)
            c.sendto(b"q2 peer\n", ("127.0.0.1", uport))
            name, kv = probe.parse_identity(c.recv(256).decode())
            assert (name, kv["req"], kv["peer"]) == ("rs-udp", "q2", "127.0.0.1")
            assert int(kv["pport"]) == c.getsockname()[1]
    finally:
        srv.stop()
        t.join(5)
        srv.close()


def test_probe_over_ipv6_loopback() -> None:
    import socket

    # The lab and CI machines have ::1; a machine without IPv6 loopback fails here rather
    # than counting a skip as a pass.
    srv = probe.IdentityServer(("::1", 0), "rs6", hold=1.0)
    port = srv.lsock.getsockname()[1]
    t = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    t.start()
    try:
        assert probe.family_of("::1") == socket.AF_INET6
        a = probe.connect_once("::1", port, mode="fin", peer=True, src=("::1", 0))
        assert a.error is None and (a.server, a.peer) == ("rs6", "::1")
    finally:
        srv.stop()
        t.join(5)
        srv.close()


def _run_result() -> dict[str, object]:
    sc = _result(
        count=3,
        ok=3,
        slow=1,
        answered_by_live=3,
        moved=3,
        syn_retrans_delta=1,
        latency_ms={"p50": 3.0, "p99": 1010.0, "max": 1010.0},
        attempts=[{"total_ms": t, "connect_ms": t, "error": None} for t in (3.0, 4.0, 1010.0)],
    )
    return {
        "modules": {"kernel_release": "6.1.0-56-cloud-amd64", "knob_present": True},
        "sysctls": {"conn_reuse_old_conntrack": 0},
        "plan": {"rule": "drop"},
        "scenarios": {"A": sc},
    }


def test_summarize_and_label() -> None:
    r = _run_result()
    row = summarize(r)["A"]
    assert (row["count"], row["slow"], row["p99"], row["live"]) == (3, 1, 1010.0, 3)
    assert "peer_sources" not in row  # a result from before the cells: no new keys
    assert modules_label(r) == "ip_vs_reuse knob=0"
    assert "killed_tcp" not in row and "old_conn_met" not in row  # an older result
    assert cell_label(r) == "INVALID-drop"


def test_summarize_cell_results() -> None:
    r = _run_result()
    sc = r["scenarios"]["A"]  # type: ignore[index]
    sc.update(
        new_conns=6,
        rule_counters={
            "new": 6,
            "nat_new": 6,  # type: ignore[union-attr]
            "masquerade": 6,
        },
        peer_sources={"10.244.1.1": 3},
        masq_mismatch=0,
        killed_tcp=3,
        killed_udp=0,
        old_conn_met=3,
    )
    u = _result(
        count=2,
        ok=2,
        slow=2,
        latency_ms={"p50": 1010.0, "p99": 1012.0, "max": 1012.0},
        peer_sources={"10.244.1.1": 2},
        masq_mismatch=0,
        new_conns=0,
        rule_counters={"new": 0},
        second_answered=0,
        third_answered=2,
        answered_by_deleted=0,
        killed_tcp=None,
        killed_udp=None,
        old_conn_met=2,
    )
    r["scenarios"]["U"] = u  # type: ignore[index]
    r["cell"] = {
        "ruleset": "kube-proxy",
        "backend": "legacy",
        "client": "outside",
        "family": 6,
        "masquerade_demanded": True,
    }
    rows = summarize(r)
    assert rows["A"]["new_conns"] == 6 and rows["A"]["masq"] is True
    assert rows["A"]["peer_sources"] == {"10.244.1.1": 3} and rows["A"]["masq_mismatch"] == 0
    assert (rows["A"]["killed_tcp"], rows["A"]["old_conn_met"], rows["A"]["nat_new"]) == (3, 3, 6)
    assert (rows["U"]["killed_udp"], rows["U"]["old_conn_met"], rows["U"]["nat_new"]) == (
        None,
        2,
        None,
    )
    assert (rows["U"]["second_answered"], rows["U"]["third_answered"]) == (0, 2)
    assert cell_label(r) == "kube-proxy/legacy outside v6 INVALID-drop"


def test_plot_writes_a_png(tmp_path: Path) -> None:
    from ipvs_fleet.probe.plot import plot_files

    src = tmp_path / "run.json"
    src.write_text(json.dumps(_run_result()))
    out = tmp_path / "A.png"
    assert plot_files([src, src], out, scenario="A") == 2
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FleetError):
        plot_files([src], out, scenario="B")


# --- scenario sequencing against the identity server on loopback (a stub topology) ---------


class StubTopology:
    """What run_scenario / run_udp use of a Topology, recording the IPVS edits and reads."""

    def __init__(self, tcp_port: int, udp_port: int) -> None:
        lay = cells.cell_layout("minimal", "outside", 4)
        self.lay = dataclasses.replace(
            lay,
            client_ip="127.0.0.1",
            real_servers={"rs-test": "127.0.0.1"},
            target=cells.Service("tcp", "127.0.0.1", tcp_port),
            udp_target=cells.Service("udp", "127.0.0.1", udp_port),
        )
        self.calls: list[tuple[str, ...]] = []

    def set_weight(self, server: str, weight: int, proto: str = "tcp") -> None:
        self.calls.append(("weight", server, str(weight)))

    def remove_server(self, server: str, proto: str = "tcp") -> None:
        self.calls.append(("remove", server, proto))

    def remove_server_flush_held(self, server: str, proto: str = "tcp") -> None:
        self.calls.append(("remove_held", server, proto))

    def add_server(self, server: str, proto: str = "tcp") -> None:
        self.calls.append(("add", server, proto))

    def ipvs_conns_from_port(self, port: int, proto: str = "tcp") -> int:
        self.calls.append(("read", str(port), proto))
        return 1


@pytest.fixture
def stub_topology() -> Iterator[StubTopology]:
    srv = probe.IdentityServer(("127.0.0.1", 0), "rs-test", hold=1.0, udp_port=0)
    assert srv.usock is not None
    topo = StubTopology(srv.lsock.getsockname()[1], srv.usock.getsockname()[1])
    t = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    t.start()
    yield topo
    srv.stop()
    t.join(5)
    srv.close()


def test_scenario_counts_the_old_connection_before_each_reconnect(
    stub_topology: StubTopology,
) -> None:
    topo = stub_topology
    r = scenarios.run_scenario(topo, "A", 2, timeout=5, deadline=30)  # type: ignore[arg-type]
    assert (r["count"], r["errors"], r["old_conn_met"], r["flush_held"]) == (2, 0, 2, False)
    base = cells.PORT_BASE
    assert topo.calls == [("read", str(base), "tcp"), ("read", str(base + 1), "tcp")]


def test_udp_scenario_with_the_flush_held(stub_topology: StubTopology) -> None:
    topo = stub_topology
    r = scenarios.run_udp(
        topo,  # type: ignore[arg-type]
        1,
        timeout=5,
        deadline=30,
        hold_flush=True,
    )
    assert (r["count"], r["setup_errors"], r["second_answered"]) == (1, 0, 1)
    assert (r["old_conn_met"], r["flush_held"]) == (1, True)
    port = str(cells.PORT_BASE + cells.SCENARIOS.index("U") * cells.PORT_SPAN)
    # deleted without queueing the flush, the old connection read, the server added back
    assert topo.calls == [
        ("remove_held", "rs-test", "udp"),
        ("read", port, "udp"),
        ("add", "rs-test", "udp"),
    ]
    topo.calls.clear()
    racing = scenarios.run_udp(topo, 1, timeout=5, deadline=30)  # type: ignore[arg-type]
    assert racing["old_conn_met"] is None  # no read: it would change the race
    assert topo.calls == [("remove", "rs-test", "udp"), ("add", "rs-test", "udp")]
