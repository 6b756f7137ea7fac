"""The held-connections gate (`gate.held_connections`): its setting, the verdict on a host's
result, the guest commands, and the teardown whatever ends the deploy.

The hosts are recording stand-in shells that answer as the guest script would
(`ipvs_fleet.probe.inflight`); the guest itself runs on the lab (tests/lab/test_deploy.py,
tests/lab/test_rollout_lab.py).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from ipvs_fleet.cli import main
from ipvs_fleet.errors import ConfigError
from ipvs_fleet.rollout import cli as rollout_cli
from ipvs_fleet.rollout import held as H
from ipvs_fleet.rollout.config import load_config, parse_waves, plan_waves
from ipvs_fleet.rollout.engine import Rollout
from ipvs_fleet.rollout.held import HeldConnections, HeldHost, verdict
from ipvs_fleet.rollout.journal import Journal, read_journal
from ipvs_fleet.rollout.runner import Outcome, Progress, PyinfraRunner, StepResult

BOOT = "0b6c1d2e-boot"
RESET = "ConnectionResetError: [Errno 104] Connection reset by peer"


def result(broken: int = 0, count: int = 100, seconds: float = 23.4) -> dict[str, Any]:
    """What the guest's `down` prints."""
    failures = [{"conn": i, "round": 26, "at": 12.8 + i, "error": RESET} for i in range(broken)]
    return {
        "connections": count,
        "broken": broken,
        "exchanges": 4600,
        "seconds": seconds,
        "failures": failures,
    }


# -- the setting ----------------------------------------------------------------------------


def write(tmp_path: Path, gate: str) -> Path:
    p = tmp_path / "rollout.yml"
    p.write_text(f"waves: [canary, '100%']\ngate:\n{gate}")
    return p


def test_the_setting_is_off_unless_given_and_the_packaged_policy_parses():
    assert load_config().gate.held_connections == 0


def test_held_connections_setting(tmp_path):
    assert load_config(write(tmp_path, "  held_connections: 100\n")).gate.held_connections == 100
    assert load_config(write(tmp_path, "  checks: true\n")).gate.held_connections == 0


@pytest.mark.parametrize("bad", ["-1", "1001", "'100'", "true", "1.5", "[100]"])
def test_a_bad_held_connections_value_names_the_file_and_the_key(tmp_path, bad):
    p = write(tmp_path, f"  held_connections: {bad}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value).startswith(
        f"{p}: gate.held_connections: must be a number of connections 0..1000 (0: off), got "
    )


def test_a_misspelt_gate_key_is_named(tmp_path):
    p = write(tmp_path, "  held_connection: 100\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value).startswith(f"{p}: gate: a mapping with keys ")
    assert "held_connections" in str(e.value) and "(unknown: held_connection)" in str(e.value)


# -- the verdict ----------------------------------------------------------------------------


def test_none_broken_passes_with_a_note_saying_how_many_and_how_long():
    v = verdict(HeldHost("h", result=result()), 100)
    assert v.ok
    assert v.reason == (
        "100 connections held through a private IPVS service for 23.4 s of the deploy: none broke"
    )
    assert v.details["held"] == {
        "connections": 100,
        "broken": 0,
        "exchanges": 4600,
        "seconds": 23.4,
    }


def test_any_broken_connection_fails_the_host_naming_the_first():
    v = verdict(HeldHost("h", result=result(broken=3)), 100)
    assert not v.ok
    assert v.reason == (
        "3 of 100 connections held through a private IPVS service broke "
        f"during the deploy (first at 12.8 s: {RESET})"
    )
    assert v.details["held"]["broken"] == 3 and v.details["held"]["first"]["conn"] == 0


@pytest.mark.parametrize(
    ("h", "why"),
    [
        (
            HeldHost("h", error="sh: 1: python3: not found (exit 127)"),
            "100 connections held through a private IPVS service could not be set up: sh: 1: "
            "python3: not found (exit 127)",
        ),
        (
            HeldHost("h", lost="the host rebooted during the deploy, and the connections with it"),
            "the result of the 100 connections held through a private IPVS service could not be "
            "read: the host rebooted",
        ),
        (
            HeldHost("h", result={"error": "no result: the client had died or never started"}),
            "the 100 connections held through a private IPVS service: no result: the client had "
            "died",
        ),
    ],
)
def test_connections_not_set_up_or_without_a_result_fail_the_host(h, why):
    v = verdict(h, 100)
    assert not v.ok and v.reason.startswith(why), v.reason


def test_judge_adds_the_verdicts_to_the_gate_outcomes():
    held = HeldConnections(100, connect=lambda name: FakeShell(name, {}), script=b"x")
    held.verdicts = {
        "good": verdict(HeldHost("good", result=result()), 100),
        "broke": verdict(HeldHost("broke", result=result(broken=2)), 100),
        "both": verdict(HeldHost("both", result=result(broken=1)), 100),
    }
    res = held.judge(
        StepResult(
            {
                "good": Outcome(True),
                "broke": Outcome(True),
                "both": Outcome(False, "patched_module: not loaded"),
                "plain": Outcome(True),
            },
            1.0,
        )
    )
    o = res.hosts
    assert o["good"].ok and o["good"].details["note"].endswith("none broke")
    assert not o["broke"].ok and o["broke"].reason.startswith("2 of 100 connections")
    assert not o["both"].ok and o["both"].reason.startswith("1 of 100 connections")
    assert o["both"].reason.endswith("; patched_module: not loaded")
    assert o["plain"] == Outcome(True)  # no held connections there: as the checks said
    assert held.verdicts == {}


# -- the guest commands ---------------------------------------------------------------------


def test_install_writes_the_script_as_root_into_a_root_only_folder():
    cmd = H.install_command(b"print('guest')\n")
    b64 = re.search(r"printf %s (\S+) \| base64 -d", cmd)
    assert b64 and base64.b64decode(b64.group(1)) == b"print('guest')\n"
    assert cmd.startswith('[ "$(id -u)" = 0 ] || {') and "umask 077" in cmd
    assert cmd.endswith(f"mv -f {H.REMOTE}.new {H.REMOTE}")


def test_the_guest_runs_only_if_its_sha256_is_the_controllers(tmp_path, monkeypatch):
    """The check itself, run by sh: the controller's script runs (slot 1), a changed one
    does not."""
    script = tmp_path / "inflight.py"
    script.write_text("import os, sys\nprint(os.environ['INFLIGHT_SLOT'], *sys.argv[1:])\n")
    monkeypatch.setattr(H, "REMOTE", str(script))
    # the hosts' `python3`: this interpreter (a root with python3.13 alone has no such name)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    cmd = H.guest_command(hashlib.sha256(script.read_bytes()).hexdigest(), "up", "100")
    r = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=30)
    assert (r.returncode, r.stdout) == (0, "1 up 100\n"), r.stderr
    script.write_text(script.read_text() + "# changed on the host\n")
    r = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, timeout=30)
    assert r.returncode == 3 and r.stdout == ""
    assert "not the script the controller sent (sha256 differs)" in r.stderr


# -- holding them through a deploy ----------------------------------------------------------


class FakeShell:
    """One host as the guest script answers; `log` records (host, step) for every command."""

    def __init__(self, name: str, behave: dict[str, Any], log: list[tuple[str, str]] | None = None):
        self.name, self.behave, self.log = name, behave, log if log is not None else []
        self.closed = False

    def run(self, cmd: str, timeout: float) -> tuple[int, str, str]:
        step = (
            "install"
            if "base64 -d" in cmd
            else "up"
            if " up " in cmd
            else "down"
            if cmd.rstrip().endswith(" down")
            else cmd
        )
        self.log.append((self.name, step))
        if step == "install":
            return self.behave.get("install", (0, "", ""))
        if step == "up":
            assert timeout >= H.up_timeout(100)
            return self.behave.get("up", (0, f"{BOOT}\n" + json.dumps(result(seconds=0.6)), ""))
        if step == "down":
            assert f"!= {BOOT} ]" in cmd or "cat /proc" in cmd
            boot = self.behave.get("boot", BOOT)
            if "down_raises" in self.behave:
                raise self.behave.pop("down_raises")
            return (
                0,
                f"{boot}\n"
                + ("" if boot != BOOT else json.dumps(self.behave.get("result", result()))),
                "",
            )
        raise AssertionError(cmd)

    def close(self) -> None:
        self.closed = True


class Fleet:
    """A connect function over FakeShells: per-host behaviour, one log, every shell made."""

    def __init__(self, **behave: dict[str, Any]) -> None:
        self.behave = behave
        self.log: list[tuple[str, str]] = []
        self.shells: list[FakeShell] = []

    def connect(self, name: str) -> FakeShell:
        b = self.behave.setdefault(name, {})
        if "connect" in b:
            raise b["connect"]
        s = FakeShell(name, b, self.log)
        self.shells.append(s)
        return s

    def steps(self, name: str) -> list[str]:
        return [s for h, s in self.log if h == name]


def hold(fleet, hosts, body=lambda: None):  # type: ignore[no-untyped-def]
    """Hold 100 connections on `hosts` through `body`: the HeldConnections, its progress."""
    held = HeldConnections(100, fleet.connect, script=b"guest")
    said: list[str] = []
    with held.during(hosts, lambda h, s: said.append(s)):
        body()
    return held, said


def test_held_on_every_host_through_the_block_then_torn_down_and_judged():
    fleet = Fleet(b={"result": result(broken=3)})
    held, said = hold(fleet, ["a", "b"])
    assert fleet.steps("a") == fleet.steps("b") == ["install", "up", "down"]
    assert held.verdicts["a"].ok and not held.verdicts["b"].ok
    assert all(s.closed for s in fleet.shells)
    assert said[0] == "hold 100 connections through a private IPVS service on 2 host(s)"
    assert said[-1] == "held connections: 1 host(s) with none broken, 1 FAILED"


def test_an_interrupted_deploy_still_tears_down_every_host(tmp_path):
    fleet = Fleet()
    with pytest.raises(KeyboardInterrupt):
        hold(fleet, ["a", "b"], body=lambda: (_ for _ in ()).throw(KeyboardInterrupt))
    assert fleet.steps("a")[-1] == fleet.steps("b")[-1] == "down"
    assert all(s.closed for s in fleet.shells)


def test_the_runner_holds_them_around_its_deploy_and_judges_them_in_its_gate(tmp_path, monkeypatch):
    """PyinfraRunner: up before the pyinfra deploy, down after it even when it raises; the
    gate's outcomes get the verdicts."""
    fleet = Fleet()
    runner = PyinfraRunner(
        inventory=tmp_path / "inv.py",
        use_checks=False,
        held=HeldConnections(100, fleet.connect, script=b"guest"),
    )

    def pyinfra(deploy_file, hosts, progress, **kw):  # type: ignore[no-untyped-def]
        fleet.log.append(("pyinfra", str(deploy_file)))
        if kw.get("what") == "deploy" and "boom" in hosts:
            raise KeyboardInterrupt
        return StepResult({h: Outcome(True) for h in hosts}, 0.0), {}

    monkeypatch.setattr(runner, "pyinfra", pyinfra)
    noop: Progress = lambda h, s: None  # noqa: E731
    runner.deploy(["a"], noop)
    assert fleet.log[:3] == [("a", "install"), ("a", "up"), ("pyinfra", "deploy.py")]
    assert fleet.log[3] == ("a", "down")
    gate = runner.gate(["a"], noop)
    assert gate.hosts["a"].ok and gate.hosts["a"].details["held"]["broken"] == 0
    with pytest.raises(KeyboardInterrupt):
        runner.deploy(["boom"], noop)
    assert fleet.steps("boom") == ["install", "up", "down"]


def test_a_host_that_cannot_be_set_up_fails_alone_and_its_half_topology_is_removed():
    fleet = Fleet(
        gone={"connect": OSError("no route to host")},
        noroot={"install": (1, "", "needs root: connect as root, or use sudo")},
        noipvs={
            "up": (
                1,
                "",
                "inflight: `ipvsadm -A -t 10.253.10.1:7311 -s rr` failed: "
                "sh: 1: ipvsadm: not found",
            )
        },
    )
    held, _ = hold(fleet, ["ok", "gone", "noroot", "noipvs"])
    assert fleet.steps("gone") == []
    assert fleet.steps("noroot") == ["install"]  # nothing made: nothing to remove
    assert fleet.steps("noipvs") == ["install", "up", "down"]
    assert held.verdicts["ok"].ok
    why = {h: v.reason for h, v in held.verdicts.items() if not v.ok}
    assert why["gone"].endswith("could not be set up: OSError: no route to host")
    assert f"could not be set up: cannot install {H.REMOTE}: needs root" in why["noroot"]
    assert why["noipvs"].endswith("ipvsadm: not found (exit 1)")


def test_a_reboot_during_the_deploy_and_a_lost_link_are_said():
    fleet = Fleet(rebooted={"boot": "another-boot"}, dropped={"down_raises": EOFError()})
    held, _ = hold(fleet, ["rebooted", "dropped"])
    assert "rebooted during the deploy" in held.verdicts["rebooted"].reason
    # the link dropped while the deploy ran: one new connection reads the result
    assert fleet.steps("dropped") == ["install", "up", "down", "down"]
    assert held.verdicts["dropped"].ok


def test_off_holds_nothing():
    fleet = Fleet()
    held = HeldConnections(0, fleet.connect, script=b"guest")
    with held.during(["a"], lambda h, s: None):
        pass
    assert fleet.log == [] and held.verdicts == {}


# -- in the journal and the report ----------------------------------------------------------


class GateRunner:
    """Every deploy passes; the gate says what the held connections said."""

    def __init__(self, outcomes: dict[str, Outcome]) -> None:
        self.outcomes = outcomes

    def deploy(self, hosts: Sequence[str], progress: Progress) -> StepResult:
        return StepResult({h: Outcome(True) for h in hosts}, 0.0)

    def gate(self, hosts: Sequence[str], progress: Progress) -> StepResult:
        return StepResult({h: self.outcomes[h] for h in hosts}, 0.0)

    def rollback(self, hosts: Sequence[str], progress: Progress) -> StepResult:
        return StepResult({h: Outcome(True) for h in hosts}, 0.0)


def test_the_verdict_is_the_hosts_journal_detail_and_a_broken_one_halts_the_wave(tmp_path):
    good = verdict(HeldHost("c", result=result()), 100)
    bad = verdict(HeldHost("n1", result=result(broken=3)), 100)
    hosts = [("c", ("canary",)), ("n1", ()), ("n2", ())]
    waves = plan_waves(hosts, parse_waves("canary,100%"))
    outcomes = {"c": Outcome(True, details={"note": good.reason}), "n1": bad, "n2": Outcome(True)}
    res = Rollout(waves, GateRunner(outcomes), Journal(tmp_path / "j.jsonl")).run()
    assert res.outcome == "halted" and res.halted_at == 2
    doc = res.to_dict()["hosts"]
    assert doc["c"]["state"] == "new-verified" and doc["c"]["detail"] == good.reason
    assert doc["n1"]["state"] == "rolled-back"
    assert doc["n1"]["detail"] == f"rolled back after: {bad.reason}"
    assert read_journal(tmp_path / "j.jsonl").hosts["c"].detail == good.reason


def test_the_cli_gives_the_runner_held_connections_only_when_the_policy_asks(tmp_path, monkeypatch):
    made: list[dict[str, Any]] = []

    class Stub(GateRunner):
        def __init__(self, **options: Any) -> None:
            made.append(options)

        def gate(self, hosts: Sequence[str], progress: Progress) -> StepResult:
            return StepResult({h: Outcome(True) for h in hosts}, 0.0)

    monkeypatch.setattr(rollout_cli, "PyinfraRunner", Stub)
    inv = tmp_path / "inv.py"
    inv.write_text('canary = [("c1", {"ipvs_host_class": "k8s_node"})]\n')
    policy = write(tmp_path, "  checks: false\n  held_connections: 50\n")
    args = ["rollout", str(inv), "--waves", "canary", "--journal", str(tmp_path / "j.jsonl")]
    assert main([*args, "--config", str(policy)]) == 0
    assert isinstance(made[-1]["held"], HeldConnections) and made[-1]["held"].count == 50
    assert main([*args, "--new"]) == 0
    assert made[-1]["held"] is None
