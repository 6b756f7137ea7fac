"""The director pair (lab/fleet-pair.yml: lvs-a, lvs-b, keepalived VRRP instance VI_1, lvs-a
the higher priority) is one failure domain, in both engines: `ipvs-fleet rollout` and
`ansible-playbook ipvs_fleet.fleet.site` each take the VRRP backup (lvs-b) alone, then the
master (lvs-a) alone; the drain hooks of the lab's group data (ipvs_pre_activate: the drain
file at -100, then a wait until the VIPs left; ipvs_post_activate: 0) move the VIPs to lvs-b
for lvs-a's activation and back, as keepalived's own log on each director shows.

Run on the pair lab: IPVS_FLEET_FLEET=lab/fleet-pair.yml IPVS_FLEET_TEST_LAB_DIR=<its dir>.
Left as found: both directors rolled back (no fix module, no knob), drain files 0, lvs-a
master.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ipvs_fleet.ansible_inventory import write_lab_inventory
from ipvs_fleet.kernel import MODULE_NAME
from ipvs_fleet.lab.inventory import DRAIN_FILE, PAIR_GROUP, PAIR_VIPS
from tests.fixtures.collection import collection_env
from tests.fixtures.lab import FINGERPRINT

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.lab, pytest.mark.destructive, pytest.mark.pair_lab]
MASTER, BACKUP = "lvs-a", "lvs-b"
VIP = PAIR_VIPS[0]
CURSOR = "journalctl -q -n 0 --show-cursor | sed -n 's/^-- cursor: //p'"


def holds_vip(lab, host: str) -> bool:  # type: ignore[no-untyped-def]
    return bool(lab.run(host, f"ip -o addr show | grep -q ' inet {VIP}/'", check=False).ok)


def wait_master(lab, host: str, seconds: float = 30) -> bool:  # type: ignore[no-untyped-def]
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if holds_vip(lab, host) and not holds_vip(lab, MASTER if host == BACKUP else BACKUP):
            return True
        time.sleep(1)
    return False


def vrrp_log(lab, host: str, cursor: str) -> list[str]:  # type: ignore[no-untyped-def]
    """keepalived's VRRP state changes on `host` since `cursor`, in order."""
    out = lab.run(
        host,
        f"journalctl -q --no-pager -o cat -u keepalived --after-cursor='{cursor}' "
        "| grep -o 'Entering [A-Z]* STATE' || true",
    ).stdout
    return [line.split()[1] for line in out.splitlines()]


def cursors(lab) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {h: lab.run(h, CURSOR).stdout.strip() for h in (MASTER, BACKUP)}


def fix_loaded(lab, host: str) -> bool:  # type: ignore[no-untyped-def]
    return bool(lab.run(host, f"test -d /sys/module/{MODULE_NAME}", check=False).ok)


def assert_vip_moved_and_back(lab, since: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    """The master's drain handed the VIPs to the backup and its post hook took them back."""
    # the post hook only lifts the drain: the master preempts a few adverts later (a run
    # that ends right after the hook found lvs-a's log still at BACKUP)
    assert wait_master(lab, MASTER), f"{MASTER} did not take the VIPs back"
    a, b = vrrp_log(lab, MASTER, since[MASTER]), vrrp_log(lab, BACKUP, since[BACKUP])
    assert "BACKUP" in a and a[-1] == "MASTER", f"{MASTER}: {a}"
    assert "MASTER" in b and b[-1] == "BACKUP", f"{BACKUP}: {b}"


def rollback_pair(lab, deployer) -> None:  # type: ignore[no-untyped-def]
    """Both directors on stock, drains 0, lvs-a master. One at a time, the backup first: the
    rollback's unload runs the drain hooks too, and both drained at once would leave the
    master's VIPs nowhere to go (its hook would wait in vain)."""
    for h in (BACKUP, MASTER):
        deployer.run("deploy/rollback.py", "--limit", h)
    for h in (MASTER, BACKUP):
        lab.run(h, f"echo 0 > {DRAIN_FILE}")
    assert wait_master(lab, MASTER), f"{MASTER} is not the VRRP master after the rollback"


def pair_running(lab) -> None:  # type: ignore[no-untyped-def]
    assert {MASTER, BACKUP} <= set(lab.hosts), (
        "the pair lab is not running (IPVS_FLEET_FLEET=lab/fleet-pair.yml, "
        f"IPVS_FLEET_TEST_LAB_DIR): hosts {sorted(lab.hosts)}"
    )
    assert wait_master(lab, MASTER), f"{MASTER} is not the VRRP master"


@pytest.fixture
def no_ftp_module(lab):  # type: ignore[no-untyped-def]
    """ip_vs_ftp out of the directors' kernels for the test, loaded again afterwards where it
    was: an earlier test's ftp class (test_director_pair.py) leaves it loaded, unused, and
    the reuse interlock rightly refuses knob 1 beside it."""
    pair_running(lab)
    had = [
        h for h in (MASTER, BACKUP) if lab.run(h, "test -d /sys/module/ip_vs_ftp", check=False).ok
    ]
    for h in had:
        lab.run(h, "rmmod ip_vs_ftp")
    try:
        yield
    finally:
        for h in had:
            lab.run(h, "modprobe ip_vs_ftp")


@pytest.fixture
def pair_on_stock(lab, deployer, no_ftp_module):  # type: ignore[no-untyped-def]
    rollback_pair(lab, deployer)
    assert not fix_loaded(lab, MASTER) and not fix_loaded(lab, BACKUP)
    try:
        yield
    finally:
        rollback_pair(lab, deployer)
        for h in (MASTER, BACKUP):
            assert lab.run(h, f"cat {DRAIN_FILE}").stdout.strip() == "0"
            assert not fix_loaded(lab, h), f"{h}: the fix module is still loaded"


def test_split_brain_refuses_before_any_director_changes(  # type: ignore[no-untyped-def]
    lab, artifacts, deployer, installed_collection, no_ftp_module, tmp_path
):
    """Both directors holding the VIPs (added by hand on the backup): both engines refuse,
    and neither director changed (their IPVS files, modules and sysctls, down to each
    file's change time)."""
    before = {h: lab.run(h, FINGERPRINT).stdout for h in (MASTER, BACKUP)}
    for vip in PAIR_VIPS:
        lab.run(BACKUP, f"ip addr add {vip}/32 dev lo")
    try:
        report = tmp_path / "report.json"
        r = subprocess.run(
            [
                str(BIN / "ipvs-fleet"),
                "rollout",
                str(deployer.inventory),
                "--limit",
                PAIR_GROUP,
                "--waves",
                "100%",
                "--journal",
                str(tmp_path / "j.jsonl"),
                "--json",
                str(report),
            ],
            cwd=REPO,
            env=deployer.env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert r.returncode == 1, r.stderr[-4000:]
        assert "split brain" in " ".join(r.stderr.split()), r.stderr[-4000:]
        doc = json.loads(report.read_text())
        assert doc["halted_at_wave"] == 1
        assert "split brain" in doc["waves"][0]["refused"]
        assert {h: doc["hosts"][h]["state"] for h in (MASTER, BACKUP)} == {
            MASTER: "old",
            BACKUP: "old",
        }
        inv = write_lab_inventory(lab, tmp_path / "lab.ansible.yml")
        p = subprocess.run(
            [str(BIN / "ansible-playbook"), "-i", str(inv), "ipvs_fleet.fleet.site"],
            cwd=tmp_path,
            env=collection_env(installed_collection, deployer.env),
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert p.returncode != 0 and "split brain" in p.stdout, p.stdout[-4000:]
        assert {h: lab.run(h, FINGERPRINT).stdout for h in (MASTER, BACKUP)} == before
    finally:
        for vip in PAIR_VIPS:
            lab.run(BACKUP, f"ip addr del {vip}/32 dev lo", check=False)
    assert wait_master(lab, MASTER)


def test_rollout_takes_the_backup_then_the_master(  # type: ignore[no-untyped-def]
    lab, artifacts, deployer, pair_on_stock, tmp_path
):
    since = cursors(lab)
    report, journal = tmp_path / "report.json", tmp_path / "j.jsonl"
    t0 = time.monotonic()
    r = subprocess.run(
        [
            str(BIN / "ipvs-fleet"),
            "rollout",
            str(deployer.inventory),
            "--limit",
            PAIR_GROUP,
            "--waves",
            "100%",  # both at once, but for the failure domain
            "--journal",
            str(journal),
            "--json",
            str(report),
        ],
        cwd=REPO,
        env=deployer.env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    secs = time.monotonic() - t0
    assert r.returncode == 0, r.stderr[-6000:]
    doc = json.loads(report.read_text())
    # two waves, the backup's first: the plan deferred one director, the roles read before
    # wave 1 put lvs-b (backup) in it
    assert [w["hosts"] for w in doc["plan"]] == [[BACKUP], [MASTER]], doc["plan"]
    assert {h: doc["hosts"][h]["state"] for h in (MASTER, BACKUP)} == {
        MASTER: "new-verified",
        BACKUP: "new-verified",
    }
    recs = [json.loads(x) for x in journal.read_text().splitlines()]
    domain = [x for x in recs if x["event"] == "domain"]
    assert domain[0]["roles"] == {MASTER: "master", BACKUP: "backup"}, domain
    assert domain[0]["takes"] == [BACKUP] and domain[0]["wave"] == 1
    verified = [x["host"] for x in recs if x["event"] == "host" and x["state"] == "verified"]
    assert verified == [BACKUP, MASTER]
    assert_vip_moved_and_back(lab, since)
    assert fix_loaded(lab, MASTER) and fix_loaded(lab, BACKUP)
    print(f"pair rollout: {secs:.0f} s; waves {[w['hosts'] for w in doc['plan']]}")


def test_site_playbook_takes_the_backup_then_the_master(  # type: ignore[no-untyped-def]
    lab, artifacts, deployer, installed_collection, pair_on_stock, tmp_path
):
    inv = write_lab_inventory(lab, tmp_path / "lab.ansible.yml")
    since = cursors(lab)
    t0 = time.monotonic()
    r = subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", str(inv), "ipvs_fleet.fleet.site"],
        cwd=tmp_path,
        env=collection_env(installed_collection, deployer.env),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    secs = time.monotonic() - t0
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    plays = re.split(r"^PLAY \[", out, flags=re.M)
    backups = next(p for p in plays if p.startswith("Roll out to the failure domains' VRRP back"))
    masters = next(p for p in plays if p.startswith("Roll out to the failure domains' VRRP mast"))
    assert f"[{BACKUP}]" in backups and f"[{MASTER}]" not in backups
    assert f"[{MASTER}]" in masters and f"[{BACKUP}]" not in masters
    play = "PLAY [Roll out to the failure domains' VRRP "
    assert out.index(play + "backups") < out.index(play + "masters")
    assert_vip_moved_and_back(lab, since)
    assert fix_loaded(lab, MASTER) and fix_loaded(lab, BACKUP)
    print(f"pair site.yml: {secs:.0f} s")
