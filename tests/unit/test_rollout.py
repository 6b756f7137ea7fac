"""Rollout orchestration: wave planning, thresholds, halt, rollback, journal and resume.

The runner here is a recording stand-in for pyinfra (what it would do to hosts is tested on
the lab and the simulated fleet, tests/lab/test_rollout*.py); these tests pin the decisions.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from ipvs_fleet.cli import main
from ipvs_fleet.errors import ConfigError
from ipvs_fleet.rollout import journal as J
from ipvs_fleet.rollout.config import load_config, parse_waves, plan_waves
from ipvs_fleet.rollout.engine import COMPLETED, HALTED, Rollout
from ipvs_fleet.rollout.journal import Journal, read_journal
from ipvs_fleet.rollout.runner import Outcome, Progress, StepResult, gate_outcomes

HOSTS = [(f"h{i:02d}", ("k8s_nodes",)) for i in range(1, 51)]


def sizes(waves):
    return [len(w.hosts) for w in waves]


def test_ansible_serial_semantics_in_inventory_order():
    waves = plan_waves(HOSTS, parse_waves("1,10%,50%,100%"))
    assert sizes(waves) == [1, 5, 25, 19]
    assert [h for w in waves for h in w.hosts] == [h for h, _ in HOSTS]


def test_last_entry_repeats_and_groups_go_first():
    hosts = [("a", ("web",)), ("b", ("web", "canary")), *HOSTS[:9]]
    waves = plan_waves(hosts, parse_waves("canary,2,30%"))
    assert waves[0].hosts == ("b",)
    assert sizes(waves) == [1, 2, 3, 3, 2]  # 10 left after canary: 2, then 30% = 3 repeated
    assert [w.spec for w in waves] == ["canary", "2", "30%", "30%", "30%"]


def test_default_policy_file_parses():
    cfg = load_config()
    assert [str(w) for w in cfg.waves] == ["canary", "1", "10%", "50%", "100%"]
    assert cfg.rollback_failed_wave is True
    assert cfg.host_command_timeout_seconds == 900


@pytest.mark.parametrize(
    ("spec", "msg"),
    [
        ("0", "at least 1"),
        ("150%", "1%..100%"),
        ("10 %", "not a wave"),
        ("", "no waves"),
        ("a b", "not a wave"),
    ],
)
def test_bad_wave_specs(spec, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_waves(spec)


def test_unknown_group_is_an_error():
    with pytest.raises(ConfigError, match="no such group"):
        plan_waves(HOSTS, parse_waves("canary,100%"))


def test_groups_only_leaving_hosts_out_is_an_error():
    hosts = [("c", ("canary",)), *HOSTS]
    with pytest.raises(ConfigError, match="leave 50 host"):
        plan_waves(hosts, parse_waves("canary"))


def test_bad_policy_file(tmp_path):
    p = tmp_path / "r.yml"
    p.write_text("waves: [1]\nmax_fail_percent: 300\n")
    with pytest.raises(ConfigError, match="max_fail_percent"):
        load_config(p)
    p.write_text("waves: [1]\nbogus: 1\n")
    with pytest.raises(ConfigError, match=r"\(unknown: bogus\)"):
        load_config(p)


class FakeRunner:
    """Records every call; fails the hosts it is told to, per step."""

    def __init__(
        self, fail_deploy=(), fail_gate=(), fail_rollback=(), interrupt_at=None, refuse=()
    ):
        self.calls: list[tuple[str, tuple[str, ...]]] = []
        self.fail = {
            "deploy": set(fail_deploy),
            "gate": set(fail_gate),
            "rollback": set(fail_rollback),
        }
        self.refuse = set(refuse)  # the deploy's preflight refuses these (nothing changed)
        self.interrupt_at = interrupt_at

    def _step(self, what: str, hosts: Sequence[str]) -> StepResult:
        self.calls.append((what, tuple(hosts)))
        if self.interrupt_at and (what, hosts[0]) == self.interrupt_at:
            raise KeyboardInterrupt
        out = {h: Outcome(h not in self.fail[what], f"{what} failed") for h in hosts}
        if what == "deploy":
            for h in self.refuse & set(hosts):
                out[h] = Outcome(False, f"refused: host {h}: uses ftp", refused=True)
        return StepResult(out, 0.0)

    def deploy(self, hosts: Sequence[str], progress: Progress) -> StepResult:
        return self._step("deploy", hosts)

    def gate(self, hosts: Sequence[str], progress: Progress) -> StepResult:
        return self._step("gate", hosts)

    def rollback(self, hosts: Sequence[str], progress: Progress) -> StepResult:
        return self._step("rollback", hosts)

    def touched(self) -> set[str]:
        return {h for _, hs in self.calls for h in hs}


def rollout(
    tmp_path, runner, spec="1,10%,50%,100%", previous=None, mfp=0.0, rollback=True, set_id="set-a"
):
    waves = plan_waves(HOSTS, parse_waves(spec), max_fail_percent=mfp)
    return Rollout(
        waves,
        runner,
        Journal(tmp_path / "j.jsonl"),
        previous=previous,
        rollback=rollback,
        set_id=set_id,
    )


def test_all_waves_pass(tmp_path):
    r = FakeRunner()
    res = rollout(tmp_path, r).run()
    assert res.outcome == COMPLETED
    assert set(res.states().values()) == {J.NEW_VERIFIED}
    assert [c[0] for c in r.calls] == ["deploy", "gate"] * 4
    assert [len(c[1]) for c in r.calls[::2]] == [1, 5, 25, 19]


def test_failed_gate_halts_rolls_back_the_wave_and_never_touches_later_waves(tmp_path):
    r = FakeRunner(fail_gate={"h03"})
    res = rollout(tmp_path, r).run()
    assert res.outcome == HALTED and res.halted_at == 2
    assert r.calls[-1] == ("rollback", ("h02", "h03", "h04", "h05", "h06"))
    assert r.touched() == {f"h{i:02d}" for i in range(1, 7)}
    st = res.states()
    assert st["h01"] == J.NEW_VERIFIED
    assert {st[f"h{i:02d}"] for i in range(2, 7)} == {J.REPORT_ROLLED_BACK}
    assert {st[f"h{i:02d}"] for i in range(7, 51)} == {J.OLD}
    doc = res.to_dict()
    assert doc["counts"] == {"new-verified": 1, "rolled-back": 5, "old": 44}
    assert "gate failed" in doc["hosts"]["h03"]["detail"]


def test_unreachable_host_counts_as_failed_and_its_rollback_leaves_it_unknown(tmp_path):
    r = FakeRunner(fail_deploy={"h01"}, fail_rollback={"h01"})
    res = rollout(tmp_path, r).run()
    assert res.outcome == HALTED and res.halted_at == 1
    assert ("gate", ("h01",)) not in r.calls  # a host that failed its deploy is never gated
    assert res.states()["h01"] == J.FAILED_UNKNOWN


def test_a_refused_host_fails_its_wave_but_is_never_rolled_back(tmp_path):
    """The deploy's preflight refused h03: its wave fails and halts, its other hosts (deployed)
    roll back, h03 is left alone on its old state, the record says why."""
    r = FakeRunner(refuse={"h03"})
    res = rollout(tmp_path, r).run()
    assert res.outcome == HALTED and res.halted_at == 2
    assert r.calls[-1] == ("rollback", ("h02", "h04", "h05", "h06"))
    assert ("gate", ("h02", "h04", "h05", "h06")) in r.calls
    doc = res.to_dict()["hosts"]["h03"]
    assert doc["state"] == J.OLD and doc["journal_state"] == J.REFUSED
    assert "refused: host h03: uses ftp" in doc["detail"]
    assert res.states()["h02"] == J.REPORT_ROLLED_BACK
    # a resume deploys it again (it never was)
    res2 = rollout(tmp_path, FakeRunner(), previous=read_journal(tmp_path / "j.jsonl")).run()
    assert res2.outcome == COMPLETED and res2.states()["h03"] == J.NEW_VERIFIED


def test_within_threshold_the_wave_passes_and_only_failed_hosts_roll_back(tmp_path):
    r = FakeRunner(fail_gate={"h10"})
    res = rollout(tmp_path, r, mfp=10).run()
    assert res.outcome == COMPLETED
    assert ("rollback", ("h10",)) in r.calls
    assert res.states()["h10"] == J.REPORT_ROLLED_BACK


def test_no_rollback_reports_failed_unknown(tmp_path):
    r = FakeRunner(fail_gate={"h01"})
    res = rollout(tmp_path, r, rollback=False).run()
    assert not [c for c in r.calls if c[0] == "rollback"]
    assert res.states()["h01"] == J.FAILED_UNKNOWN


def test_interrupted_mid_wave_resumes_each_host_deployed_once_more_at_most(tmp_path):
    r1 = FakeRunner(interrupt_at=("gate", "h07"))
    with pytest.raises(KeyboardInterrupt):
        rollout(tmp_path, r1).run()
    view = read_journal(tmp_path / "j.jsonl")
    assert view.hosts["h01"].state == J.VERIFIED
    assert view.hosts["h07"].state == J.GATING  # caught mid-step: unknown, deploy again
    r2 = FakeRunner()
    res = rollout(tmp_path, r2, previous=view).run()
    assert res.outcome == COMPLETED
    deployed_again = [h for what, hs in r2.calls if what == "deploy" for h in hs]
    assert not {"h01", "h02", "h06"} & set(deployed_again)
    assert deployed_again[:5] == ["h07", "h08", "h09", "h10", "h11"]
    assert len(deployed_again) == 44  # h07..h50: wave 3 was mid-gate


def test_a_resume_after_a_rebuild_deploys_the_hosts_verified_with_the_old_set(tmp_path):
    r1 = FakeRunner(interrupt_at=("gate", "h07"))
    with pytest.raises(KeyboardInterrupt):
        rollout(tmp_path, r1).run()
    view = read_journal(tmp_path / "j.jsonl")
    assert view.hosts["h01"].set_id == "set-a" and view.hosts["h07"].set_id == ""
    r2 = FakeRunner()
    res = rollout(tmp_path, r2, previous=view, set_id="set-b").run()
    assert res.outcome == COMPLETED
    deployed_again = [h for what, hs in r2.calls if what == "deploy" for h in hs]
    assert len(deployed_again) == 50  # waves 1-2 were verified with set-a: deployed again
    assert read_journal(tmp_path / "j.jsonl").hosts["h01"].set_id == "set-b"


def test_a_rollback_cut_off_by_the_controller_is_finished_as_a_rollback(tmp_path):
    r1 = FakeRunner(fail_gate={"h03"}, interrupt_at=("rollback", "h02"))
    with pytest.raises(KeyboardInterrupt):
        rollout(tmp_path, r1).run()
    view = read_journal(tmp_path / "j.jsonl")
    assert {view.hosts[f"h{i:02d}"].state for i in range(2, 7)} == {J.ROLLING_BACK}
    r2 = FakeRunner()
    res = rollout(tmp_path, r2, previous=view).run()
    # the resume rolls wave 2 back (never deploys it again) and halts there
    assert r2.calls == [("rollback", ("h02", "h03", "h04", "h05", "h06"))]
    assert res.outcome == HALTED and res.halted_at == 2
    st = res.states()
    assert st["h01"] == J.NEW_VERIFIED
    assert {st[f"h{i:02d}"] for i in range(2, 7)} == {J.REPORT_ROLLED_BACK}
    assert {st[f"h{i:02d}"] for i in range(7, 51)} == {J.OLD}


def test_journal_survives_a_torn_last_line(tmp_path):
    p = tmp_path / "j.jsonl"
    j = Journal(p)
    j.write("start", waves=[["1", ["a"]]], inventory="x", resume=False)
    j.host("a", J.DEPLOYING, 1)
    j.close()
    with p.open("a") as f:
        f.write('{"event": "host", "host": "a", "sta')  # kill -9 mid-write
    j2 = Journal(p)
    j2.host("a", J.VERIFIED, 1)
    j2.close()
    view = read_journal(p)
    assert view.hosts["a"].state == J.VERIFIED
    assert view.hosts["a"].history == [J.DEPLOYING, J.VERIFIED]


def test_gate_outcomes_unreached_host_fails():
    res: list[dict[str, Any]] = [
        {"host": "a", "check": "sysctls", "status": "passed"},
        {
            "host": "b",
            "check": "latency_budget",
            "status": "failed",
            "message": "p99 above 1 ms",
            "details": {"probe": {"count": 20, "slow": 0, "errors": 0}},
        },
        {"host": "c", "check": "sysctls", "status": "error", "message": "unreachable"},
    ]
    out = gate_outcomes(res, ["a", "b", "c", "d"])
    assert [out[h].ok for h in "abcd"] == [True, False, False, False]
    assert "p99" in out["b"].reason and out["b"].details["probe"]["count"] == 20
    assert "not reached" in out["d"].reason


INVENTORY = """
canary = [("c1", {"ipvs_host_class": "k8s_node"})]
k8s_nodes = [("n1", {"ipvs_host_class": "k8s_node"}), ("n2", {"ipvs_host_class": "k8s_node"})]
"""


def write_inventory(tmp_path: Path, text: str = INVENTORY) -> Path:
    p = tmp_path / "inv.py"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    ("extra", "msg"),
    [
        (["--waves", "nosuch,100%"], "no such group"),
        (["--waves", "canary,0"], "at least 1"),
        (["--resume"], "no journal to resume"),
    ],
)
def test_cli_bad_input_is_refused_before_any_host(tmp_path, capsys, extra, msg):
    inv = write_inventory(tmp_path)
    rc = main(["rollout", str(inv), "--journal", str(tmp_path / "j.jsonl"), *extra])
    assert rc == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "j.jsonl").exists()


def test_cli_policy_error_names_the_host(tmp_path, capsys):
    inv = write_inventory(tmp_path, INVENTORY.replace('"k8s_node"})]\nk8s', '"nope"})]\nk8s'))
    rc = main(["rollout", str(inv), "--journal", str(tmp_path / "j.jsonl")])
    assert rc == 2
    assert "host c1: unknown host class 'nope'" in capsys.readouterr().err


def test_cli_refuses_to_overwrite_a_journal(tmp_path, capsys):
    inv = write_inventory(tmp_path)
    j = tmp_path / "j.jsonl"
    j.write_text(json.dumps({"event": "start", "waves": [["1", ["c1"]]]}) + "\n")
    assert main(["rollout", str(inv), "--journal", str(j)]) == 2
    assert "--resume" in capsys.readouterr().err
