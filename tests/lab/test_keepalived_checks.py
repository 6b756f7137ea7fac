"""The keepalived checks seen failing on real directors, through `ipvs-fleet check`.

Written for the director pair (lab/fleet-pair.yml: lvs-a the VRRP master, lvs-b the backup;
`make test` runs the `pair_lab` tests there). It works on any lab whose lvs_director hosts
run lab/pair/director.sh's keepalived.conf (VI_1, its drain track file): the first director
takes lvs-a's part, the last lvs-b's (one and the same on a one-VM lab: its faults add up).
Each fault is put on a director, the checks run, exactly the expected keepalived checks fail
with what differs; then the fault is taken off and the roles come back (the first director
MASTER, the other BACKUP) before the test ends. Only the keepalived checks are asserted: the
fix module may or may not be deployed on the directors.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ipvs_fleet.compliance import keepalived as ka
from ipvs_fleet.keepalived.compare import vrrp_roles
from tests.fixtures.checks import Checker, CheckRun

pytestmark = [pytest.mark.lab, pytest.mark.destructive, pytest.mark.pair_lab]

CHECKS = ("keepalived_config", "keepalived_table", "keepalived_vrrp", "keepalived_sync")
CONF = ka.DEFAULT_CONF
DRAIN = "/etc/keepalived/drain"  # lab/pair/director.sh's track file (weight 1)
BACKUP_COPY = "/root/keepalived.conf.keepalived-checks-test"
STRAY = "192.0.2.99:443"  # a service keepalived does not configure (TEST-NET-1)


def director(lab: Any, host: str) -> ka.Director:
    kf = ka.parse_section(lab.run(host, ka.COMMAND).stdout.splitlines())
    assert kf is not None, f"{host}: keepalived is not configured"
    # the pair's VRRP instance is in an included file, read as the checks read it
    return ka.director(kf, ka.remote_reader(lambda cmd: lab.run(host, cmd)))


def role(lab: Any, host: str) -> str:
    d = director(lab, host)
    if not d.running:
        return "stopped"
    roles, _ = vrrp_roles(d.config, d.own_states, d.addresses)
    return roles.get("VI_1", "?")


def wait_for(what: str, ok: Callable[[], bool], seconds: float = 60) -> None:
    end = time.monotonic() + seconds
    while not ok():
        assert time.monotonic() < end, f"not within {seconds:g} s: {what}"
        time.sleep(1)


def settled(lab: Any, a: str, b: str) -> None:
    """The pair as it starts: `a` MASTER, `b` BACKUP (one director: MASTER)."""
    if a == b:
        wait_for(f"{a} MASTER", lambda: role(lab, a) == "MASTER")
    else:
        wait_for(f"{a} MASTER, {b} BACKUP", lambda: (role(lab, a), role(lab, b)) == (
            "MASTER", "BACKUP"))  # fmt: skip


@pytest.fixture(scope="module")
def pair(lab: Any) -> tuple[str, str]:
    directors = sorted(n for n, h in lab.hosts.items() if h.host_class == "lvs_director")
    assert directors, "no lvs_director host in the lab"
    return directors[0], directors[-1]


@pytest.fixture(scope="module")
def checker(lab: Any, tmp_path_factory: pytest.TempPathFactory) -> Checker:
    env = dict(os.environ, IPVS_FLEET_LAB_DIR=str(lab.dir))
    return Checker(lab.inventory_path, env, tmp_path_factory.mktemp("ka-checks"))


def check(checker: Checker, hosts: set[str]) -> CheckRun:
    run = checker.run("--limit", ",".join(sorted(hosts)))
    assert run.doc, run.out + run.err
    return run


def failing(run: CheckRun, host: str) -> set[str]:
    return {c for c, s in run.status(host).items() if c in CHECKS and s != "passed"}


def message(run: CheckRun, host: str, check: str) -> str:
    [r] = [r for r in run.doc["results"] if r["host"] == host and r["check"] == check]
    return str(r["message"])


def expect_failing(run: CheckRun, *want: tuple[str, set[str]]) -> None:
    """Exactly these keepalived checks fail, per host (a host named twice: the union)."""
    merged: dict[str, set[str]] = {}
    for host, checks in want:
        merged.setdefault(host, set()).update(checks)
    got = {h: failing(run, h) for h in merged}
    assert got == merged, run.out


@pytest.fixture
def restored(lab: Any, pair: tuple[str, str]) -> Iterator[list[Callable[[], object]]]:
    """Undo steps the test registers, run in reverse order even when it fails; then the pair
    is back as it started."""
    a, b = pair
    settled(lab, a, b)
    undo: list[Callable[[], object]] = []
    try:
        yield undo
    finally:
        for step in reversed(undo):
            step()
        settled(lab, a, b)


def test_table_sync_and_config_faults_fail_their_checks(
    lab: Any, pair: tuple[str, str], checker: Checker, restored: list[Callable[[], object]]
) -> None:
    a, b = pair
    clean = check(checker, {a, b})
    expect_failing(clean, (a, set()), (b, set()))
    roles = {h: r["details"].get("vrrp") for r in clean.doc["results"] for h in [r["host"]]
             if r["check"] == "keepalived_vrrp"}  # fmt: skip
    assert roles[a] == {"VI_1": "MASTER"}
    if a != b:
        # keepalived 2.2.7 runs the backup sync daemon on the VRRP backup: its check passed
        assert roles[b] == {"VI_1": "BACKUP"}
        assert [d.role for d in director(lab, b).daemons] == ["backup"]
    d = director(lab, a)
    [daemon] = d.daemons
    syncid = d.config.sync_id()
    assert syncid is not None, "no lvs_sync_daemon in keepalived.conf"
    assert (daemon.role, daemon.syncid) == ("master", syncid)
    before = lab.run(a, "ipvsadm -Ln --daemon").stdout

    # a: a service keepalived did not configure, and the sync daemon on another sync id
    lab.run(a, f"ipvsadm -A -t {STRAY} -s wlc")
    restored.append(lambda: lab.run(a, f"ipvsadm -D -t {STRAY}"))
    restart = "ipvsadm --stop-daemon master && ipvsadm --start-daemon master "
    lab.run(a, f"{restart} --mcast-interface {daemon.interface} --syncid {syncid + 1}")
    restored.append(
        lambda: lab.run(a, f"{restart} --mcast-interface {daemon.interface} --syncid {syncid}")
    )
    # b: a keyword keepalived does not know, in its file (keepalived is not reloaded)
    lab.run(b, f"cp -p {CONF} {BACKUP_COPY} && echo ipvs_fleet_no_such_keyword >> {CONF}")
    restored.append(lambda: lab.run(b, f"mv {BACKUP_COPY} {CONF}"))

    run = check(checker, {a, b})
    expect_failing(run, (a, {"keepalived_table", "keepalived_sync"}), (b, {"keepalived_config"}))
    assert f"TCP {STRAY} in the IPVS table, not in keepalived's configuration" in message(
        run, a, "keepalived_table"
    )
    assert f"sync daemon: master syncid {syncid + 1}, configured id {syncid}" in message(
        run, a, "keepalived_sync"
    )
    cfg_msg = message(run, b, "keepalived_config")
    assert f"keepalived --config-test -f {CONF}: expected exit 0, actual exit " in cfg_msg
    assert "ipvs_fleet_no_such_keyword" in cfg_msg

    for step in reversed(restored):
        step()
    restored.clear()
    assert lab.run(a, "ipvsadm -Ln --daemon").stdout == before
    expect_failing(check(checker, {a, b}), (a, set()), (b, set()))


def test_a_fault_instance_and_a_stopped_keepalived_fail_their_checks(
    lab: Any, pair: tuple[str, str], checker: Checker, restored: list[Callable[[], object]]
) -> None:
    a, b = pair
    # a: its track file at -254 puts VI_1 in FAULT (b, if there is one, takes over)
    lab.run(a, f"echo -254 > {DRAIN}")
    restored.append(lambda: lab.run(a, f"echo 0 > {DRAIN}"))
    wait_for(f"{a} FAULT", lambda: role(lab, a) == "FAULT")
    if a != b:
        wait_for(f"{b} MASTER", lambda: role(lab, b) == "MASTER")
        run = check(checker, {a, b})
        expect_failing(run, (a, {"keepalived_vrrp", "keepalived_sync"}), (b, set()))
    else:
        run = check(checker, {a})
        expect_failing(run, (a, {"keepalived_vrrp", "keepalived_sync"}))
    assert "VRRP VI_1: FAULT, not MASTER or BACKUP" in message(run, a, "keepalived_vrrp")
    assert "sync daemon: VRRP VI_1 is FAULT: no role to sync" in message(run, a, "keepalived_sync")
    restored.pop()()
    settled(lab, a, b)

    # b: keepalived stopped (it takes its table and sync daemon with it)
    lab.run(b, "systemctl stop keepalived")
    restored.append(lambda: lab.run(b, "systemctl start keepalived"))
    run = check(checker, {a, b})
    expect_failing(run, (a, set()), (b, {"keepalived_table", "keepalived_vrrp", "keepalived_sync"}))
    for c in ("keepalived_table", "keepalived_vrrp", "keepalived_sync"):
        assert "keepalived is not running" in message(run, b, c)
    assert "not in the IPVS table" in message(run, b, "keepalived_table")


def test_a_host_without_keepalived_passes_its_checks_as_not_configured(
    lab: Any, pair: tuple[str, str], checker: Checker, tmp_path: Path
) -> None:
    """keepalived.conf moved away on a director (keepalived keeps running from memory): the
    checks do not apply there."""
    a, b = pair
    lab.run(b, f"mv {CONF} {BACKUP_COPY}")
    try:
        run = check(checker, {b})
    finally:
        lab.run(b, f"mv {BACKUP_COPY} {CONF}")
    for r in run.doc["results"]:
        if r["check"] in CHECKS:
            assert (r["status"], r["details"]) == ("passed", {"keepalived": ka.NOT_CONFIGURED})
