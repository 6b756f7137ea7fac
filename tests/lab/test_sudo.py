"""Non-root SSH with sudo, as real fleets are reached: every lab VM has `fleet`
(passwordless sudo) and `fleetpw` (a sudo that asks for a password). The deploy, the
rollback and the checks run as `fleet` through sudo; a sudo that asks for a password is
refused before anything changes, naming the host. (The Ansible path runs as `fleet` with
`become` in tests/lab/test_ansible.py.) `make test` runs this on the side lab
(lab/fleet-side.yml), beside the main lab's tests."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.deploy import REPO, Deployer
from tests.fixtures.lab import FINGERPRINT
from tests.lab.test_deploy import assert_converged, live_state

pytestmark = [pytest.mark.lab, pytest.mark.side_lab]

HOST = "k8s-canary"
BIN = Path(sys.executable).parent
SUDO_INVENTORY = REPO / "inventory" / "lab_sudo.py"
# What sudo logged for a user since a journal cursor: the commands it ran as root.
SUDO_LOG = "journalctl -q --no-pager _COMM=sudo --after-cursor='{}' | grep -c ' {} : .*COMMAND='"


def sudo_deployer(deployer, user: str) -> Deployer:
    return Deployer(SUDO_INVENTORY, dict(deployer.env, IPVS_FLEET_LAB_SUDO_USER=user))


def cursor(lab) -> str:
    return lab.run(HOST, "journalctl -q -n 0 --show-cursor | sed -n 's/^-- cursor: //p'").stdout


def sudo_count(lab, since: str, user: str) -> int:
    return int(lab.run(HOST, SUDO_LOG.format(since.strip(), user), check=False).stdout or 0)


def check(env: dict[str, str], inventory: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "ipvs-fleet"), "check", inventory, "--limit", HOST, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.destructive
@pytest.mark.slow  # ~2 min; make test runs the rollout as fleet with sudo (deploy, gate, check)
def test_rollback_and_deploy_as_fleet_with_sudo(lab, artifacts, deployer, deployed):
    fleet = sudo_deployer(deployer, "fleet")
    since = cursor(lab)
    back = fleet.run("deploy/rollback.py", "--limit", HOST)
    assert back.rc == 0
    assert live_state(lab, HOST)["loaded"] == "", "the fix module is still loaded"
    again = fleet.run("deploy.py", "--limit", HOST)
    assert again.totals["success"] > 0
    assert_converged(lab, artifacts, HOST)
    # (The checks as fleet: after the Ansible path, tests/lab/test_ansible.py.)
    # It was fleet, through sudo, that did all this.
    n = sudo_count(lab, since, "fleet")
    print(f"rollback {back.seconds:.1f} s, deploy {again.seconds:.1f} s as fleet: {n} sudo")
    assert n > 20


def test_a_sudo_that_asks_for_a_password_is_refused_before_any_change(lab, deployer, deployed):
    pw = sudo_deployer(deployer, "fleetpw")
    before = {n: lab.run(n, FINGERPRINT).stdout for n in lab.hosts}
    r = pw.run("deploy/rollback.py", check=False)
    out = r.stdout + r.stderr
    assert r.rc != 0
    # the first host refused aborts the run: any of them may be the one named
    named = re.search(r"host (\S+): sudo as fleetpw asks for a password", out)
    assert named and named.group(1) in lab.hosts, out[-3000:]
    r = pw.run("deploy.py", check=False)
    assert r.rc != 0 and "sudo as fleetpw asks for a password" in r.stdout + r.stderr
    assert {n: lab.run(n, FINGERPRINT).stdout for n in lab.hosts} == before
    c = check(pw.env, str(SUDO_INVENTORY))
    assert c.returncode != 0
    assert f"{HOST}: sudo as fleetpw asks for a password" in c.stdout + c.stderr, c.stdout[-3000:]


# An inventory that reaches the hosts as `fleet` and says nothing of sudo, as many real
# fleets' do: `ipvs-fleet rollout --sudo` gives the sudo, to the deploy and the gate alike.
FLEET_WITHOUT_SUDO = """
from ipvs_fleet.lab.inventory import pyinfra_groups

globals().update({g: [(n, {k: v for k, v in d.items() if k != "_sudo"}) for n, d in hs]
                  for g, hs in pyinfra_groups(user="fleet").items()})
"""
SECRET = "rollout-Pw-31x"  # fleet's sudo asks for none: pyinfra passes it and sudo ignores it


def mode(p: Path) -> int:
    return p.stat().st_mode & 0o777


@pytest.mark.destructive
def test_a_rollout_with_sudo_runs_its_gate_as_the_deploy_and_logs_no_secret(
    lab, artifacts, deployer, deployed, tmp_path
):
    """`ipvs-fleet rollout --sudo` on an inventory that reaches the hosts as fleet without
    sudo: its deploy and its checks gate (the latency probe included, staged through the
    user's home) run as fleet through sudo; the `_sudo_password` given with --data is in no
    log, journal, report or output, and the logs are the owner's alone."""
    fleet = sudo_deployer(deployer, "fleet")
    assert fleet.run("deploy/rollback.py", "--limit", HOST).rc == 0  # something to roll out
    inv = tmp_path / "fleet_no_sudo.py"
    inv.write_text(FLEET_WITHOUT_SUDO)
    since = cursor(lab)
    journal, report = tmp_path / "j.jsonl", tmp_path / "rollout.json"
    r = subprocess.run(
        [
            str(BIN / "ipvs-fleet"),
            "rollout",
            str(inv),
            "--sudo",
            "--waves",
            "100%",
            "--data",
            f"_sudo_password={SECRET}",
            "--limit",
            HOST,
            "--journal",
            str(journal),
            "--json",
            str(report),
        ],
        cwd=REPO,
        env=fleet.env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    logs = journal.with_suffix(".logs")
    files = [journal, report, *sorted(logs.iterdir())]
    leaks = [p.name for p in files if p.is_file() and SECRET in p.read_text(errors="replace")]
    leaks += [name for name, out in (("stdout", r.stdout), ("stderr", r.stderr)) if SECRET in out]
    print(
        f"secrets found in logs: {len(leaks)} {leaks}; log modes "
        f"{sorted({oct(mode(p)) for p in files[2:]})}, dir {oct(mode(logs))}"
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    doc = json.loads(report.read_text())
    assert doc["outcome"] == "completed", doc
    assert doc["hosts"][HOST]["state"] == "new-verified", doc["hosts"]
    assert_converged(lab, artifacts, HOST)
    n = sudo_count(lab, since, "fleet")
    print(f"rollout as fleet with --sudo: {n} sudo commands")
    assert n > 20
    assert leaks == []
    assert {mode(p) for p in files[2:]} == {0o600} and mode(logs) == 0o700
