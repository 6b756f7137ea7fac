"""`ipvs-fleet rollout` as a user runs it again and again: a completed journal is archived and
a new rollout starts, --resume continues only an unfinished one, --limit, pyinfra options
passed through to the pyinfra children, and --dry from pyinfra's own dry run.

The runner is a recording stand-in (the CLI's PyinfraRunner replaced), except where the test
checks the pyinfra command lines the real runner builds (its child process replaced).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from ipvs_fleet.cli import main
from ipvs_fleet.rollout import cli as rollout_cli
from ipvs_fleet.rollout import journal as J
from ipvs_fleet.rollout import runner as R
from ipvs_fleet.rollout.journal import read_journal
from ipvs_fleet.rollout.runner import (
    Outcome,
    PlannedHost,
    Progress,
    PyinfraRunner,
    StepResult,
    plan_outcomes,
)

INVENTORY = """
canary = [("c1", {"ipvs_host_class": "k8s_node"})]
k8s_nodes = [("n1", {"ipvs_host_class": "k8s_node"}), ("n2", {"ipvs_host_class": "k8s_node"})]
ftp_hosts = [("f1", {"ipvs_host_class": "ftp"})]
"""


class StubRunner:
    """Stands in for PyinfraRunner in the CLI: every step passes; records calls and options."""

    made: list[StubRunner] = []
    plans: dict[str, PlannedHost] = {}

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.calls: list[tuple[str, tuple[str, ...]]] = []
        StubRunner.made.append(self)

    def _ok(self, what: str, hosts: Sequence[str]) -> StepResult:
        self.calls.append((what, tuple(hosts)))
        return StepResult({h: Outcome(True) for h in hosts}, 0.0)

    def deploy(self, hosts: Sequence[str], progress: Progress) -> StepResult:
        return self._ok("deploy", hosts)

    def gate(self, hosts: Sequence[str], progress: Progress) -> StepResult:
        return self._ok("gate", hosts)

    def rollback(self, hosts: Sequence[str], progress: Progress) -> StepResult:
        return self._ok("rollback", hosts)

    def plan(self, hosts: Sequence[str], progress: Progress) -> dict[str, PlannedHost]:
        self.calls.append(("plan", tuple(hosts)))
        return {h: StubRunner.plans.get(h, PlannedHost()) for h in hosts}

    def deployed(self) -> list[str]:
        return [h for what, hs in self.calls if what == "deploy" for h in hs]


@pytest.fixture
def cli(tmp_path, monkeypatch):
    """run(*args) -> exit code of `ipvs-fleet rollout INV --journal J *args`, stub runner."""
    monkeypatch.setattr(rollout_cli, "PyinfraRunner", StubRunner)
    StubRunner.made, StubRunner.plans = [], {}
    inv = tmp_path / "inv.py"
    inv.write_text(INVENTORY)

    def run(*args: str) -> int:
        return main(
            [
                "rollout",
                str(inv),
                "--journal",
                str(tmp_path / "j.jsonl"),
                "--waves",
                "canary,100%",
                *args,
            ]
        )

    return run


def archived(tmp_path: Path) -> list[Path]:
    return sorted(tmp_path.glob("j.*.jsonl"))


def test_two_rollouts_in_a_row_both_complete_the_first_is_archived(cli, tmp_path, capsys):
    assert cli() == 0
    assert cli() == 0
    assert "is archived" in capsys.readouterr().err
    [old] = archived(tmp_path)
    assert read_journal(old).outcome == "completed" and read_journal(old).runs == 1
    new = read_journal(tmp_path / "j.jsonl")
    assert new.runs == 1 and new.outcome == "completed"
    assert StubRunner.made[1].deployed() == ["c1", "n1", "n2", "f1"]  # every host again
    assert cli() == 0
    assert len(archived(tmp_path)) == 2  # same second: a distinct name


def test_resume_continues_only_an_unfinished_rollout(cli, tmp_path, capsys):
    assert cli() == 0
    assert cli("--resume") == 2
    assert "completed" in capsys.readouterr().err
    assert archived(tmp_path) == []  # bad input touches nothing


def unfinished(tmp_path: Path) -> Path:
    """A journal whose controller died after the canary was verified."""
    j = J.Journal(tmp_path / "j.jsonl")
    j.write(
        "start",
        inventory="inv",
        resume=False,
        waves=[["canary", ["c1"]], ["100%", ["n1", "n2", "f1"]]],
        limit=[],
    )
    j.host("c1", J.VERIFIED, 1)
    j.host("n1", J.DEPLOYING, 2)
    j.close()
    return tmp_path / "j.jsonl"


def test_an_unfinished_rollout_is_resumed_or_archived_with_new_never_overwritten(
    cli, tmp_path, capsys
):
    unfinished(tmp_path)
    assert cli() == 2
    err = capsys.readouterr().err
    assert "unfinished rollout" in err and "--resume" in err and "--new" in err
    assert cli("--resume") == 0
    assert StubRunner.made[-1].deployed() == ["n1", "n2", "f1"]  # c1 verified before
    assert read_journal(tmp_path / "j.jsonl").runs == 2
    (tmp_path / "j.jsonl").unlink()
    unfinished(tmp_path)
    assert cli("--new") == 0
    [old] = archived(tmp_path)
    assert read_journal(old).outcome is None
    assert StubRunner.made[-1].deployed() == ["c1", "n1", "n2", "f1"]
    assert cli("--new", "--resume") == 2


def test_limit_hosts_and_groups(cli, tmp_path):
    assert cli("--limit", "n*", "--limit", "ftp_hosts") == 0
    run = StubRunner.made[-1]
    assert run.deployed() == ["n1", "n2", "f1"]  # the canary group is not in the limit
    view = read_journal(tmp_path / "j.jsonl")
    assert view.limit == ["n*", "ftp_hosts"]
    assert [hs for _, hs in view.waves] == [["n1", "n2", "f1"]]


def test_resume_keeps_the_journals_limit(cli, tmp_path):
    j = J.Journal(tmp_path / "j.jsonl")
    j.write(
        "start", inventory="inv", resume=False, waves=[["100%", ["n1", "n2"]]], limit=["k8s_nodes"]
    )
    j.host("n1", J.VERIFIED, 1)
    j.close()
    assert cli("--resume") == 0
    assert StubRunner.made[-1].deployed() == ["n2"]


@pytest.mark.parametrize(
    ("args", "msg"),
    [
        (["--limit", "nosuch"], "--limit nosuch: matches no host or group"),
        (["--data", "novalue"], "must be KEY=VALUE"),
        (["--data", "ipvs_activation=sometimes"], "host c1: ipvs_activation"),
        (["--parallel", "0"], "--parallel"),
    ],
)
def test_bad_options_are_refused_before_any_host(cli, tmp_path, capsys, args, msg):
    assert cli(*args) == 2
    assert msg in capsys.readouterr().err
    assert not StubRunner.made
    assert not (tmp_path / "j.jsonl").exists()


def test_pyinfra_options_reach_the_runner(cli):
    assert (
        cli(
            "--parallel",
            "3",
            "--sudo",
            "--data",
            "ipvs_activation=next-boot",
            "--data",
            "ssh_user=fleet",
        )
        == 0
    )
    opts = StubRunner.made[-1].options
    assert opts["pyinfra_args"] == ("--sudo", "--parallel", "3")
    assert opts["data"] == {"ipvs_activation": "next-boot", "ssh_user": "fleet"}
    # the gate's checks get all of it: a host is judged by the data its deploy got
    assert opts["gate_data"] == {**opts["data"], "_sudo": "True"}


def test_runner_command_lines(tmp_path, monkeypatch):
    seen: list[tuple[list[str], dict[str, str] | None]] = []

    def child(cmd, *, env=None, **kw):  # type: ignore[no-untyped-def]
        seen.append((list(cmd), env))
        return 0, json.dumps({"plan": [], "results": {"failed_hosts": []}}), ""

    monkeypatch.setattr(R, "run_child", child)
    r = PyinfraRunner(
        inventory=tmp_path / "inv.py",
        rollback_data={"ipvs_activation": "reboot"},
        data={"ipvs_activation": "next-boot", "x": "1"},
        pyinfra_args=("--sudo",),
        use_checks=False,
        env={"A": "1"},
        host_command_timeout=900,
    )
    noop = lambda h, s: None  # noqa: E731
    r.deploy(["a", "b"], noop)
    r.rollback(["a"], noop)
    r.gate(["a"], noop)
    plans = r.plan(["a"], noop)
    (deploy, denv), (rollback, renv), (verify, _), (plan, penv) = seen
    assert deploy[1:4] == ["-y", "--json", "--sudo"]
    assert deploy[-6:-2] == ["--data", "x=1", "--data", "_timeout=900"]
    assert "ipvs_activation=next-boot" in deploy
    # every command of the deploy and the rollback is bounded (pyinfra's `_timeout`)
    assert "_timeout=900" in rollback and "_timeout=900" not in plan
    assert deploy[4:8] == ["--limit", "a", "--limit", "b"]
    # the policy's rollback_data win for the rollback
    assert "ipvs_activation=reboot" in rollback and "ipvs_activation=next-boot" not in rollback
    assert "--sudo" in verify and verify[-1].endswith("verify_deploy.py")
    # the plan: pyinfra's dry run WITH change detection (no -y), refusals reported per host
    assert "-y" not in plan and "--dry" in plan and "--json" in plan
    # the deploy too: a refused host fails alone, untouched, and its wave goes on; every run
    # leaves failure domains to the rollout's waves
    planned = {"A": "1", "IPVS_FLEET_DOMAINS": "planned"}
    assert penv == denv == {**planned, "IPVS_FLEET_PREFLIGHT": "report"} and renv == planned
    assert plans == {"a": PlannedHost()}


def test_a_host_the_deploy_refused_is_an_outcome_of_its_own(tmp_path, monkeypatch):
    """pyinfra stops a run whose every host was refused ("No hosts remaining"): no result,
    yet each refused host is known by its `[host] refused:` line; the others failed."""
    err = (
        "--> Preparing operation files...\n"
        "    [a] refused: host a: net.ipv4.vs.conn_reuse_old_conntrack=1 refused: host uses "
        "ftp (FTP virtual service: 10.0.9.100:21)\n"
        "    [b] Error: could not connect\n"
        "--> pyinfra error: No hosts remaining!\n"
    )
    monkeypatch.setattr(R, "run_child", lambda cmd, **kw: (1, "", err))
    r = PyinfraRunner(inventory=tmp_path / "inv.py", use_checks=False)
    got = r.deploy(["a", "b"], lambda h, s: None).hosts
    assert got["a"].refused and not got["a"].ok and "10.0.9.100:21" in got["a"].reason
    assert not got["b"].refused and not got["b"].ok and "could not connect" in got["b"].reason


def test_plan_lists_each_hosts_pending_changes_per_wave(cli, capsys):
    StubRunner.plans = {
        "c1": PlannedHost(["set net.ipv4.vs.conn_reuse_old_conntrack = 1 (live 0)"]),
        "n1": PlannedHost(["install patch set 3.0+x for 6.1.0-57-cloud-amd64"]),
        "n2": PlannedHost(["install patch set 3.0+x for 6.1.0-57-cloud-amd64"]),
    }
    assert cli("--dry") == 0
    out = capsys.readouterr().out
    assert "c1:" in out and "conn_reuse_old_conntrack = 1 (live 0)" in out
    assert "n1, n2:" in out and "install patch set 3.0+x" in out
    assert "f1:" in out and "nothing (converged)" in out
    assert StubRunner.made[-1].calls == [("plan", ("c1", "n1", "n2", "f1"))]


def test_plan_exits_1_naming_a_refused_or_unplanned_host(cli, tmp_path, capsys):
    StubRunner.plans = {
        "n2": PlannedHost(refused="host n2 (kernel 6.1): conn_reuse_old_conntrack=1 refused"),
        "f1": PlannedHost(error="Could not connect (timed out)"),
    }
    assert cli("--dry") == 1
    cap = capsys.readouterr()
    assert "n2: the deploy would refuse it: host n2" in cap.err
    assert "f1: could not be planned: Could not connect" in cap.err
    assert "REFUSED" in cap.out
    assert not (tmp_path / "j.jsonl").exists()


PLAN_DOC = {
    "plan": [
        {
            "name": "Roll out | Install the fix module",
            "hosts_with_change": ["a", "b"],
            "hosts_with_conditional_change": [],
        },
        {
            "name": "Roll out | Set net.ipv4.vs.conntrack live",
            "hosts_with_change": ["a"],
            "hosts_with_conditional_change": [],
        },
    ],
    "results": None,
}


def test_plan_outcomes_from_pyinfras_dry_run():
    err = "\n".join(
        [
            "    [a] will install patch set 3.0+x for 6.1.0-57-cloud-amd64: 1 modules",
            "    \x1b[1m[a]\x1b[0m will set net.ipv4.vs.conntrack = 1 (live 0)",
            "    [c] Could not connect (Timeout connecting to host)",
            "    [d] refused: host d (kernel 5.10): kernel lockdown is integrity",
        ]
    )
    got = plan_outcomes(PLAN_DOC, err, ["a", "b", "c", "d", "e"])
    assert got["a"].changes == [
        "install patch set 3.0+x for 6.1.0-57-cloud-amd64: 1 modules",
        "set net.ipv4.vs.conntrack = 1 (live 0)",
    ]
    assert got["b"].changes == ["Install the fix module"]  # no preview line
    assert got["c"].error.startswith("Could not connect") and not got["c"].changes
    assert got["d"].refused == "host d (kernel 5.10): kernel lockdown is integrity"
    assert got["e"].ok and got["e"].changes == []
    # no JSON at all (pyinfra stopped): no host is "converged"
    none = plan_outcomes({}, "--> pyinfra error: No hosts remaining!", ["a"])
    assert not none["a"].ok and "No hosts remaining" in none["a"].error
