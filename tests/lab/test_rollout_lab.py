"""Rollout on the lab: the canary wave first and its gate; a canary that cannot meet its
gate (an impossible latency budget in its host data, a table changed during the step) halts
the rollout, and every other host is untouched, as the hosts themselves show (their IPVS
files, modules and sysctls are the same, down to each file's change time, before and after).
`make test` runs this on the side lab (lab/fleet-side.yml: the canary and one node), beside
the main lab's tests; on the main lab it runs the same.

Cost: one canary deploy, one gate (the checks with the latency probe) and one rollback on the
canary; the other hosts are only read.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ipvs_fleet.lab import vm
from ipvs_fleet.resources import default_policy_dir
from tests.fixtures.inventory import inventory_with
from tests.fixtures.lab import FINGERPRINT, on_stock

REPO = Path(__file__).resolve().parents[2]
CLI = Path(sys.executable).with_name("ipvs-fleet")
pytestmark = [pytest.mark.lab, pytest.mark.destructive, pytest.mark.side_lab]


def fingerprint(lab, host: str) -> str:  # type: ignore[no-untyped-def]
    return str(lab.run(host, FINGERPRINT).stdout)


@pytest.mark.slow  # ~80 s; make test halts a rollout at the canary's gate on the table check
def test_impossible_canary_budget_halts_and_others_stay_untouched(lab, artifacts, tmp_path):  # type: ignore[no-untyped-def]
    canary = next(n for n, h in lab.hosts.items() if "canary" in h.groups)
    others = [n for n in lab.hosts if n != canary]
    before = {h: fingerprint(lab, h) for h in others}
    # The canary's host data gets a budget no host can meet (p99 of 0 ms).
    inv = inventory_with(lab.inventory_path, tmp_path / "inv.py",
                         {canary: {"ipvs_latency_budget": {"p99_ms": 0}}})
    env = dict(os.environ, IPVS_FLEET_LAB_DIR=str(lab.dir),
               IPVS_FLEET_ARTIFACTS=str(next(iter(artifacts.values())).path.parent))  # fmt: skip
    report = tmp_path / "report.json"
    r = subprocess.run(
        [str(CLI), "rollout", str(inv), "--waves", "canary,100%", "--journal",
         str(tmp_path / "j.jsonl"), "--json", str(report)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert r.returncode == 1, r.stderr[-4000:]
    doc = json.loads(report.read_text())
    assert doc["outcome"] == "halted"
    assert doc["halted_at_wave"] == 1
    assert doc["plan"][0]["hosts"] == [canary]
    assert sorted(doc["plan"][1]["hosts"]) == sorted(others)
    assert len(doc["waves"]) == 1  # wave 2 never started
    assert doc["hosts"][canary]["state"] == "rolled-back"
    assert "latency" in doc["hosts"][canary]["detail"]
    for h in others:
        assert doc["hosts"][h]["state"] == "old"
        assert fingerprint(lab, h) == before[h], f"{h} was touched"
    # The canary itself is back on the stock set; the lab image has no fleet sysctl file, so
    # the rollback removed the one the deploy wrote.
    assert lab.run(canary, "test ! -e /lib/modules/$(uname -r)/updates/ipvs-fleet && "
                           "test ! -e /etc/sysctl.d/90-ipvs-fleet.conf", check=False).ok


def test_a_table_changed_during_the_step_fails_the_gate_naming_the_lines(  # type: ignore[no-untyped-def]
    lab, artifacts, deployer, tmp_path
):
    """The canary's swap restores its table, then its post-activate hook takes one real
    server out (standing in for anything that changes the table during the step: a restore
    gone wrong, an agent flushing services on a module reload). Every other check passes;
    the gate's service_table check compares the live table with the swap's record, fails the
    canary naming the missing line, and the rollout halts with the other hosts untouched."""
    canary = next(n for n, h in lab.hosts.items() if "canary" in h.groups)
    others = [n for n in lab.hosts if n != canary]
    on_stock(lab, deployer, canary)
    lost = "-a -t 10.97.0.2:80 -r 10.97.1.2:80 -m -w 1"
    lab.run(canary, "ipvsadm -A -t 10.97.0.2:80 -s rr && ipvsadm -a -t 10.97.0.2:80 "
            "-r 10.97.1.1:80 -m && ipvsadm -a -t 10.97.0.2:80 -r 10.97.1.2:80 -m")  # fmt: skip
    try:
        before = {h: fingerprint(lab, h) for h in others}
        # (the rollback swaps too and runs the hook again: the server is gone by then)
        hook = "ipvsadm -d -t 10.97.0.2:80 -r 10.97.1.2:80 || true"
        inv = inventory_with(lab.inventory_path, tmp_path / "inv.py",
                             {canary: {"ipvs_post_activate": hook}})
        report = tmp_path / "report.json"
        r = subprocess.run(
            [str(CLI), "rollout", str(inv), "--waves", "canary,100%", "--journal",
             str(tmp_path / "j.jsonl"), "--json", str(report)],
            cwd=REPO, env=deployer.env, capture_output=True, text=True, timeout=1200,
        )  # fmt: skip
        assert r.returncode == 1, (r.stdout + r.stderr)[-4000:]
        doc = json.loads(report.read_text())
        assert doc["outcome"] == "halted" and doc["halted_at_wave"] == 1, doc
        detail = doc["hosts"][canary]["detail"]
        # service_table alone failed: every other check of the canary passed
        assert detail.startswith("rolled back after: service_table: the IPVS service table is "
                                 "not what the last module swap restored"), detail  # fmt: skip
        assert ";" not in detail and f"expected {lost}, actual absent" in detail, detail
        assert doc["hosts"][canary]["state"] == "rolled-back", doc["hosts"][canary]
        for h in others:
            assert doc["hosts"][h]["state"] == "old"
            assert fingerprint(lab, h) == before[h], f"{h} was touched"
        # The same host and table with no hook: the gate passes (the check compares, and the
        # restored table is the record).
        assert "O" not in lab.run(canary, "cat /sys/module/ip_vs/taint").stdout
        lab.run(canary, "ipvsadm -a -t 10.97.0.2:80 -r 10.97.1.2:80 -m")
        r = subprocess.run(
            [str(CLI), "rollout", str(lab.inventory_path), "--waves", "100%", "--limit", canary,
             "--journal", str(tmp_path / "j2.jsonl"), "--json", str(report)],
            cwd=REPO, env=deployer.env, capture_output=True, text=True, timeout=1200,
        )  # fmt: skip
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
        doc = json.loads(report.read_text())
        assert doc["hosts"][canary]["state"] == "new-verified", doc["hosts"][canary]
        assert lost in lab.run(canary, "ipvsadm-save -n").stdout
    finally:
        lab.run(canary, "ipvsadm -D -t 10.97.0.2:80", check=False)


@pytest.mark.slow  # ~165 s in CI; make test-full (with the resume)
def test_a_host_frozen_mid_swap_fails_within_its_timeout_and_a_resume_completes(  # type: ignore[no-untyped-def]
    lab, artifacts, deployer, tmp_path
):
    """The canary's VM is frozen (SIGSTOP to its QEMU) while its module swap runs: its
    command fails after host_command_timeout_seconds (60 here), its rollback cannot reach it
    either, and the rollout halts within minutes, the canary `failed-unknown`, the other
    hosts untouched. Thawed, the host finishes its detached swap by itself; `--resume`
    deploys it again, passes its gate and completes the rollout (make test-full; make test
    deploys the canary instead)."""
    canary = next(n for n, h in lab.hosts.items() if "canary" in h.groups)
    others = [n for n in lab.hosts if n != canary]
    on_stock(lab, deployer, canary)
    lab.run(canary, "ipvsadm -A -t 10.97.0.1:80 -s rr && ipvsadm -a -t 10.97.0.1:80 "
            "-r 10.97.1.1:80 -m")  # fmt: skip
    try:
        table = lab.run(canary, "ipvsadm-save -n").stdout
        before = {h: fingerprint(lab, h) for h in others}
        cfg = yaml.safe_load((default_policy_dir() / "rollout.yml").read_text())
        cfg["host_command_timeout_seconds"] = 60
        (tmp_path / "rollout.yml").write_text(yaml.safe_dump(cfg))
        env = dict(deployer.env)
        report, journal = tmp_path / "report.json", tmp_path / "j.jsonl"
        cmd = [str(CLI), "rollout", str(lab.inventory_path), "--waves", "canary,100%", "--config",
               str(tmp_path / "rollout.yml"), "--journal", str(journal), "--json", str(report)]
        pid = vm.pid_of(lab.vm_files(canary))
        assert pid is not None
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)  # fmt: skip
        frozen = False
        try:
            deadline = time.monotonic() + 600
            while proc.poll() is None and time.monotonic() < deadline:
                if lab.run(canary, "test -d /var/lib/ipvs-fleet/swap.pending", check=False).rc == 0:
                    os.kill(pid, signal.SIGSTOP)
                    frozen = True
                    break
                time.sleep(0.5)
            assert frozen, "the swap was never seen running: " + (
                proc.communicate(timeout=60)[0][-3000:] if proc.poll() is not None else "")
            t_frozen = time.monotonic()
            out = proc.communicate(timeout=900)[0]
            halted_after = time.monotonic() - t_frozen
        finally:
            os.kill(pid, signal.SIGCONT)
            if proc.poll() is None:
                proc.kill()
        print(f"frozen {t_frozen - t0:.0f} s into the rollout; halted {halted_after:.0f} s later")
        assert proc.returncode == 1, out[-4000:]
        doc = json.loads(report.read_text())
        assert doc["outcome"] == "halted" and doc["halted_at_wave"] == 1, out[-4000:]
        assert doc["hosts"][canary]["state"] == "failed-unknown", doc["hosts"][canary]
        assert "timed out" in doc["hosts"][canary]["detail"], doc["hosts"][canary]
        assert halted_after < 400, "the wave waited on the frozen host past its timeouts"
        for h in others:
            assert doc["hosts"][h]["state"] == "old"
            assert fingerprint(lab, h) == before[h], f"{h} was touched"
        # Thawed: the detached swap finishes on the host (its lock comes free) with the table.
        deadline = time.monotonic() + 600
        while lab.run(canary, "flock -n /var/lib/ipvs-fleet/lock true", check=False).rc != 0:
            assert time.monotonic() < deadline, "the swap never finished after the thaw"
            time.sleep(2)
        assert lab.run(canary, "ipvsadm-save -n").stdout == table
        r = subprocess.run([*cmd, "--resume"], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=1800)  # fmt: skip
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
        doc = json.loads(report.read_text())
        assert doc["outcome"] == "completed", doc
        assert {h: v["state"] for h, v in doc["hosts"].items()} == dict.fromkeys(
            lab.hosts, "new-verified"), doc["hosts"]  # fmt: skip
        assert lab.run(canary, "ipvsadm-save -n").stdout == table
    finally:
        lab.run(canary, "ipvsadm -D -t 10.97.0.1:80", check=False)
