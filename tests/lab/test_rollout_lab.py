"""Rollout on the lab: the canary wave first and its gate. A canary that cannot meet its gate
(an impossible latency budget in its host data) halts the rollout, and every other host is
untouched, as the hosts themselves show (their IPVS files, modules and sysctls are the same,
down to each file's change time, before and after); a canary frozen in its activation fails
within its command timeout and a resume completes; connections held through IPVS on every
host live through a whole rollout and its rollback. `make test` runs this on the side lab
(lab/fleet-side.yml: the canary and one node), beside the main lab's tests; on the main lab
it runs the same.

Cost: the halted rollout (one canary deploy, one gate, one rollback: 20-80 s), the rollout of
both hosts and a rollback with connections held (~2 min); the frozen host (`slow`) a halted
rollout waiting out a 60 s command timeout and its resume.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
import yaml

from ipvs_fleet.kernel import MODULE_NAME
from ipvs_fleet.lab import vm
from ipvs_fleet.probe.inflight import held
from ipvs_fleet.resources import default_policy_dir
from tests.fixtures.inventory import inventory_with
from tests.fixtures.lab import FINGERPRINT, on_stock

REPO = Path(__file__).resolve().parents[2]
CLI = Path(sys.executable).with_name("ipvs-fleet")
pytestmark = [pytest.mark.lab, pytest.mark.destructive, pytest.mark.side_lab]


def fingerprint(lab, host: str) -> str:  # type: ignore[no-untyped-def]
    return str(lab.run(host, FINGERPRINT).stdout)


def test_impossible_canary_budget_halts_and_others_stay_untouched(lab, artifacts, tmp_path):  # type: ignore[no-untyped-def]
    canary = next(n for n, h in lab.hosts.items() if "canary" in h.groups)
    others = [n for n in lab.hosts if n != canary]
    before = {h: fingerprint(lab, h) for h in others}
    # The canary's host data gets a budget no host can meet (p99 of 0 ms).
    inv = inventory_with(
        lab.inventory_path, tmp_path / "inv.py", {canary: {"ipvs_latency_budget": {"p99_ms": 0}}}
    )
    env = dict(
        os.environ,
        IPVS_FLEET_LAB_DIR=str(lab.dir),
        IPVS_FLEET_ARTIFACTS=str(next(iter(artifacts.values())).path.parent),
    )
    report = tmp_path / "report.json"
    t0 = time.monotonic()
    r = subprocess.run(
        [
            str(CLI),
            "rollout",
            str(inv),
            "--waves",
            "canary,100%",
            "--journal",
            str(tmp_path / "j.jsonl"),
            "--json",
            str(report),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    r_secs = time.monotonic() - t0
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
    # The canary itself is back without the fix module; the lab image has no fleet sysctl
    # file, so the rollback removed the one the deploy wrote.
    assert lab.run(
        canary,
        f"test ! -d /sys/module/{MODULE_NAME} && "
        "test ! -e /lib/modules/$(uname -r)/updates/ipvs-fleet && "
        "test ! -e /etc/sysctl.d/90-ipvs-fleet.conf",
        check=False,
    ).ok
    print(f"halted at the canary's gate: {r_secs:.0f} s")


@pytest.mark.slow  # ~3 min; make test-full (a 60 s command timeout, then the resume)
def test_a_host_frozen_mid_activation_fails_within_its_timeout_and_a_resume_completes(  # type: ignore[no-untyped-def]
    lab, artifacts, deployer, tmp_path
):
    """The canary's VM is frozen (SIGSTOP to its QEMU) in its activation (its drain hook
    running, the fix module not yet loaded): its command fails after
    host_command_timeout_seconds (60 here), its rollback cannot reach it either, and the
    rollout halts within minutes, the canary `failed-unknown`, the other hosts untouched.
    Thawed, the host has IPVS and its table as they were; `--resume` deploys it again, passes
    its gate and completes the rollout."""
    canary = next(n for n, h in lab.hosts.items() if "canary" in h.groups)
    others = [n for n in lab.hosts if n != canary]
    for h in lab.hosts:
        on_stock(lab, deployer, h)
    mark = "/run/ipvs-fleet-test-frozen"
    lab.run(
        canary,
        f"rm -f {mark}; ipvsadm -A -t 10.97.0.1:80 -s rr && "
        "ipvsadm -a -t 10.97.0.1:80 -r 10.97.1.1:80 -m",
    )
    try:
        table = lab.run(canary, "ipvsadm-save -n").stdout
        before = {h: fingerprint(lab, h) for h in others}
        cfg = yaml.safe_load((default_policy_dir() / "rollout.yml").read_text())
        cfg["host_command_timeout_seconds"] = 60
        (tmp_path / "rollout.yml").write_text(yaml.safe_dump(cfg))
        # the window to freeze in: a drain hook right before the fix module loads
        inv = inventory_with(
            lab.inventory_path,
            tmp_path / "inv.py",
            {canary: {"ipvs_pre_activate": f"touch {mark}; sleep 10"}},
        )
        env = dict(deployer.env)
        report, journal = tmp_path / "report.json", tmp_path / "j.jsonl"
        cmd = [
            str(CLI),
            "rollout",
            str(inv),
            "--waves",
            "canary,100%",
            "--config",
            str(tmp_path / "rollout.yml"),
            "--journal",
            str(journal),
            "--json",
            str(report),
        ]
        pid = vm.pid_of(lab.vm_files(canary))
        assert pid is not None
        t0 = time.monotonic()
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        frozen = False
        try:
            deadline = time.monotonic() + 600
            while proc.poll() is None and time.monotonic() < deadline:
                if lab.run(canary, f"test -e {mark}", check=False).rc == 0:
                    os.kill(pid, signal.SIGSTOP)
                    frozen = True
                    break
                time.sleep(0.5)
            assert frozen, "the activation was never seen running: " + (
                proc.communicate(timeout=60)[0][-3000:] if proc.poll() is not None else ""
            )
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
        # Thawed: the hook ends by itself; nothing was loaded, IPVS and its table are as they
        # were, and no lock is left held.
        wait_for_ssh(lab, canary)
        assert lab.run(canary, f"test -d /sys/module/{MODULE_NAME}", check=False).rc != 0
        assert lab.run(canary, "ipvsadm-save -n").stdout == table
        assert lab.run(canary, "flock -w 60 /var/lib/ipvs-fleet/lock true", check=False).ok
        t1 = time.monotonic()
        r = subprocess.run(
            [*cmd, "--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1800
        )
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
        print(f"resume: {time.monotonic() - t1:.0f} s")
        doc = json.loads(report.read_text())
        assert doc["outcome"] == "completed", doc
        assert {h: v["state"] for h, v in doc["hosts"].items()} == dict.fromkeys(
            lab.hosts, "new-verified"
        ), doc["hosts"]
        assert lab.run(canary, "ipvsadm-save -n").stdout == table
    finally:
        lab.run(canary, f"ipvsadm -D -t 10.97.0.1:80; rm -f {mark}", check=False)


def wait_for_ssh(lab, host: str, seconds: float = 300) -> None:  # type: ignore[no-untyped-def]
    """Until `host` answers over SSH again (a thawed VM's clock and connections catch up)."""
    deadline = time.monotonic() + seconds
    while lab.run(host, "true", check=False, timeout=30).rc != 0:
        assert time.monotonic() < deadline, f"{host} never answered after the thaw"
        time.sleep(2)


def held_gate_config(tmp_path: Path, count: int = 100) -> Path:
    """The packaged rollout.yml with the gate's held connections on."""
    cfg = yaml.safe_load((default_policy_dir() / "rollout.yml").read_text())
    cfg["gate"]["held_connections"] = count
    path = tmp_path / "rollout.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_connections_held_on_every_host_live_through_a_rollout_and_its_rollback(  # type: ignore[no-untyped-def]
    lab, artifacts, deployer, tmp_path
):
    """100 connections held open through an IPVS NAT service on each host for the whole
    rollout (the canary wave, its gate, then the node's wave and gate) and the rollback of
    every host after it: none breaks on either host."""
    canary = next(n for n, h in lab.hosts.items() if "canary" in h.groups)
    for h in lab.hosts:
        on_stock(lab, deployer, h)
    report = tmp_path / "report.json"
    # the gate's own held connections (gate.held_connections, slot 1) beside this test's
    config = held_gate_config(tmp_path)
    with ExitStack() as stack:
        holds = {h: stack.enter_context(held(lab, h, 100)) for h in sorted(lab.hosts)}
        t0 = time.monotonic()
        r = subprocess.run(
            [
                str(CLI),
                "rollout",
                str(lab.inventory_path),
                "--waves",
                "canary,100%",
                "--config",
                str(config),
                "--journal",
                str(tmp_path / "j.jsonl"),
                "--json",
                str(report),
            ],
            cwd=REPO,
            env=deployer.env,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        rollout_s = time.monotonic() - t0
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
        doc = json.loads(report.read_text())
        assert doc["outcome"] == "completed", doc
        assert doc["plan"][0]["hosts"] == [canary] and len(doc["waves"]) == 2, doc["plan"]
        assert {h: v["state"] for h, v in doc["hosts"].items()} == dict.fromkeys(
            lab.hosts, "new-verified"
        ), doc["hosts"]
        for h, v in doc["hosts"].items():
            assert re.fullmatch(
                r"100 connections held through a private IPVS service for "
                r"[\d.]+ s of the deploy: none broke",
                v["detail"],
            ), (h, v)
        for h in lab.hosts:
            assert lab.run(h, f"cat /sys/module/{MODULE_NAME}/version").stdout.strip() == (
                artifacts[lab.hosts[h].kernel_release].set_id
            )
        mid = {h: x.status() for h, x in holds.items()}
        back = deployer.run("deploy/rollback.py")
        for h in lab.hosts:
            assert lab.run(h, f"test -d /sys/module/{MODULE_NAME}", check=False).rc != 0, h
    print(
        f"rollout (2 waves, gated) {rollout_s:.0f} s, rollback {back.seconds:.0f} s, "
        "connections held throughout"
    )
    for h, x in holds.items():
        res = x.result
        print(
            f"{h}: {res['connections']} held {res['seconds']} s, {res['exchanges']} "
            f"exchanges, {res['broken']} broken (after the rollout: {mid[h]['broken']})"
        )
        assert mid[h]["broken"] == 0, (h, mid[h])
        assert res["connections"] == 100 and res["broken"] == 0, (h, res)
        # every connection kept talking throughout: a round each second or two at least
        assert res["exchanges"] >= 100 * res["seconds"] / 2, (h, res)


def test_the_held_connections_gate_fails_a_canary_whose_deploy_breaks_them(  # type: ignore[no-untyped-def]
    lab, artifacts, deployer, tmp_path
):
    """The gate's held connections (gate.held_connections: 100) on the canary, and a
    pre-activate hook that kills their real server, as an activation that resets connections
    would: the gate fails the canary naming how many broke and when, the rollout halts and
    rolls it back, the node is untouched, and nothing of the held connections is left."""
    canary = next(n for n, h in lab.hosts.items() if "canary" in h.groups)
    others = [h for h in lab.hosts if h != canary]
    on_stock(lab, deployer, canary)  # so the activation (and its hook) runs
    before = {h: fingerprint(lab, h) for h in others}
    inv = inventory_with(
        lab.inventory_path,
        tmp_path / "inv.py",
        # the rollback runs the hook too, after the gate's teardown
        {
            canary: {
                "ipvs_pre_activate": 'p=$(ip netns pids ifls1 2>/dev/null); [ -z "$p" ] || kill $p'
            }
        },
    )
    report = tmp_path / "report.json"
    r = subprocess.run(
        [
            str(CLI),
            "rollout",
            str(inv),
            "--waves",
            "canary,100%",
            "--config",
            str(held_gate_config(tmp_path)),
            "--journal",
            str(tmp_path / "j.jsonl"),
            "--json",
            str(report),
        ],
        cwd=REPO,
        env=deployer.env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert r.returncode == 1, (r.stdout + r.stderr)[-4000:]
    doc = json.loads(report.read_text())
    assert doc["outcome"] == "halted" and doc["halted_at_wave"] == 1, doc
    c = doc["hosts"][canary]
    assert c["state"] == "rolled-back", c
    assert re.search(
        r"100 of 100 connections held through a private IPVS service broke "
        r"during the deploy \(first at [\d.]+ s: ",
        c["detail"],
    ), c
    assert {h: fingerprint(lab, h) for h in others} == before
    for h in lab.hosts:  # torn down: no slot-1 netns, device or IPVS service left
        left = lab.run(
            h,
            "ip netns list | grep -E '^ifl[cs]1'; ip -br link | "
            "grep -E '^ifl[cs]?1'; ipvsadm -Ln | grep 10.253.10.1; true",
        ).stdout
        assert not left.strip(), (h, left)
