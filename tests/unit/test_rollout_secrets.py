"""Secrets given to `ipvs-fleet rollout` (`--data _sudo_password=...`, ssh_password) stay out
of the children's command lines, the logs, the progress lines and the journal; logs are
0600 in a 0700 dir; the gate's checks reach the hosts as the deploy does (`--sudo`, the
connection's --data); a missing pyinfra is a clear error before any host is touched.

The child is a real process (a stand-in `pyinfra` script that prints everything it was
given, as pyinfra's -vvv would) and the logs are written by the real runner.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from ipvs_fleet.cli import main
from ipvs_fleet.compliance.inventory import load_inventory
from ipvs_fleet.rollout import runner as R
from ipvs_fleet.rollout.journal import read_journal
from ipvs_fleet.rollout.runner import PyinfraRunner

SECRET = "s3cr3t-Pw-4711"
INVENTORY = 'k8s_nodes = [("a", {"ipvs_host_class": "k8s_node", "ssh_user": "root"})]\n'
FAKE_PYINFRA = """#!{python}
import json, os, sys
from ipvs_fleet.compliance.inventory import load_inventory
# its inventory as pyinfra's loader reads it (a wrapper exists only while the child runs)
hosts = {{h.name: dict(h.data, groups=h.groups) for h in load_inventory(sys.argv[-2])}}
with open(os.environ["FAKE_PYINFRA_RECORD"], "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "hosts": hosts}}, default=str) + "\\n")
# the worst case: a child that prints all it was given (argv and environment)
print("    [a] given: " + " ".join(sys.argv[1:]) + " " + json.dumps(dict(os.environ)),
      file=sys.stderr)
print("    [a] Success", file=sys.stderr)
print(json.dumps({{"plan": [], "results": {{"failed_hosts": []}}}}))
"""


@pytest.fixture
def fake_pyinfra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """R.PYINFRA replaced by a script recording each run (argv, env) in the returned file."""
    script = tmp_path / "bin" / "pyinfra"
    script.parent.mkdir()
    script.write_text(FAKE_PYINFRA.format(python=sys.executable))
    script.chmod(0o755)
    monkeypatch.setattr(R, "PYINFRA", script)
    record = tmp_path / "runs.jsonl"
    monkeypatch.setenv("FAKE_PYINFRA_RECORD", str(record))
    return record


def runs(record: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in record.read_text().splitlines()]


@contextmanager
def environ(env: dict[str, str]) -> Iterator[None]:
    old = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(old)


def hits(paths: list[Path]) -> list[Path]:
    return [p for p in paths if p.is_file() and SECRET in p.read_text(errors="replace")]


def test_a_secret_in_data_reaches_pyinfra_by_environment_and_is_masked_in_logs(
    tmp_path, fake_pyinfra
):
    inv = tmp_path / "inv.py"
    inv.write_text(INVENTORY)
    (tmp_path / "group_data").mkdir()
    (tmp_path / "group_data" / "all.py").write_text("from_group_data = 1\n")
    logs = tmp_path / "j.logs"
    lines: list[str] = []
    r = PyinfraRunner(
        inventory=inv,
        data={"_sudo_password": SECRET, "ssh_user": "fleet"},
        use_checks=False,
        log_dir=logs,
        env=dict(os.environ),
    )
    res = r.deploy(["a"], lambda h, s: lines.append(s))
    assert res.hosts["a"].ok
    [run] = runs(fake_pyinfra)
    assert not [a for a in run["argv"] if SECRET in a], run["argv"]
    assert "ssh_user=fleet" in run["argv"]  # the plain --data still on the command line
    # the inventory the child was given has the secret as host data, from its environment
    data = run["hosts"]["a"]
    assert data["_sudo_password"] == SECRET
    assert data["from_group_data"] == 1 and data["ssh_user"] == "root"
    assert data["groups"] == ["k8s_nodes", "inv"]  # pyinfra's file-named group kept
    # nothing it printed leaks the secret: log, progress, the result's log
    [log] = list(logs.iterdir())
    assert hits([log]) == [] and "***" in log.read_text()
    assert not [s for s in lines if SECRET in s] and SECRET not in res.log
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    assert stat.S_IMODE(logs.stat().st_mode) == 0o700


def test_the_gate_runs_as_the_deploy_and_no_secret_reaches_journal_logs_or_report(
    tmp_path, fake_pyinfra, monkeypatch, capsys
):
    """`rollout --sudo --data ssh_user=... --data ssh_password=...`: the gate's checks child
    loads the inventory it is given (as it does) and sees that identity."""
    real_run_child = R.run_child
    seen: list[dict[str, Any]] = []

    def child(cmd, *, env=None, **kw):  # type: ignore[no-untyped-def]
        if "ipvs_fleet.rollout.gate_checks" not in cmd:
            return real_run_child(cmd, env=env, **kw)
        inv, out = cmd[cmd.index("--inventory") + 1], cmd[cmd.index("--out") + 1]
        with environ(env if env is not None else dict(os.environ)):
            hosts = load_inventory(inv)
        seen.extend(h.data for h in hosts)
        ok = all(
            h.data.get("_sudo") is True
            and h.data.get("ssh_user") == "fleet"
            and h.data.get("ssh_password") == SECRET
            for h in hosts
        )
        res = [
            {
                "host": h.name,
                "check": "identity",
                "status": "passed" if ok else "failed",
                "message": "" if ok else f"not the deploy's identity: {h.data}",
            }
            for h in hosts
        ]
        Path(out).write_text(json.dumps(res))
        return 0, "", ""

    monkeypatch.setattr(R, "run_child", child)
    monkeypatch.setattr(R, "checks_available", lambda: True)
    inv = tmp_path / "inv.py"
    inv.write_text(INVENTORY)
    j, report = tmp_path / "j.jsonl", tmp_path / "report.json"
    rc = main(
        [
            "rollout",
            str(inv),
            "--journal",
            str(j),
            "--waves",
            "100%",
            "--sudo",
            "--data",
            "ssh_user=fleet",
            "--data",
            f"ssh_password={SECRET}",
            "--json",
            str(report),
        ]
    )
    cap = capsys.readouterr()
    assert rc == 0, cap.err[-3000:]
    assert seen and all(d["_sudo"] is True for d in seen)
    assert read_journal(j).outcome == "completed"
    # the deploy's pyinfra got --sudo and the plain data on its command line, no secret
    for run in runs(fake_pyinfra):
        assert "--sudo" in run["argv"] and "ssh_user=fleet" in run["argv"]
        assert not [a for a in run["argv"] if SECRET in a]
    logs = sorted(j.with_suffix(".logs").iterdir())
    assert logs and hits([*logs, j, report]) == []
    assert SECRET not in cap.out + cap.err
    assert {stat.S_IMODE(p.stat().st_mode) for p in logs} == {0o600}


def test_a_missing_pyinfra_is_a_clear_error_before_any_host(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "venv" / "bin" / "pyinfra"
    monkeypatch.setattr(R, "PYINFRA", missing)
    inv = tmp_path / "inv.py"
    inv.write_text(INVENTORY)
    j = tmp_path / "j.jsonl"
    for extra in ([], ["--dry"]):
        assert main(["rollout", str(inv), "--journal", str(j), "--waves", "100%", *extra]) == 2
        err = capsys.readouterr().err
        assert f"{missing}: pyinfra not found" in err, err
        assert not j.exists()  # no journal: no rollout started, no host touched
