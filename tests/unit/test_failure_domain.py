"""Failure domains (host data ipvs_failure_domain): the wave planner never takes two hosts of
one domain in one wave (a group wave that would is refused, a count or percentage defers the
second), and before each wave the engine reads the domain's VRRP roles: the backup goes first,
a split brain or a domain without master refuses the wave.

The VRRP roles come from a fake reader here (the real one reads keepalived.conf and the
addresses over SSH: tests/lab/test_pair_rollout.py); these tests pin the decisions.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from ipvs_fleet.errors import ConfigError
from ipvs_fleet.rollout import journal as J
from ipvs_fleet.rollout.config import parse_waves, plan_waves
from ipvs_fleet.rollout.domains import DomainOrder, domain_problems, vrrp_order
from ipvs_fleet.rollout.engine import COMPLETED, HALTED, Rollout
from ipvs_fleet.rollout.journal import Journal, read_journal
from ipvs_fleet.rollout.runner import Outcome, PlannedHost, Progress, StepResult
from ipvs_fleet.rollout.vrrp import (
    ROLE_MARK,
    VrrpState,
    parse_vips,
    role_command,
    vrrp_state,
)
from ipvs_fleet.validation import failure_domains

PAIR = {"lvs-a": "pair", "lvs-b": "pair"}
HOSTS = [("c1", ("canary",)), ("lvs-a", ("dirs",)), ("lvs-b", ("dirs",)), ("n1", ()), ("n2", ())]

CONF = """\
global_defs {
    router_id lvs-a   # a comment { with a brace
}
! a keepalived comment
vrrp_instance VI_1 {
    state BACKUP
    interface eth1
    virtual_ipaddress {
        10.0.9.100/24 dev eth1
        10.0.10.1/24 dev eth1 label eth1:gw
    }
}
vrrp_instance VI_2 {
    virtual_ipaddress {
        192.0.2.7
    }
    virtual_ipaddress_excluded {
        192.0.2.8
    }
}
virtual_server 10.0.9.100 80 {
    real_server 10.0.10.21 8080 {
        weight 1
    }
}
"""


def hosts_of(plan):
    return [list(w.hosts) for w in plan]


# -- validation -------------------------------------------------------------------------------


def test_failure_domain_host_data_is_validated():
    assert failure_domains([("a", {"ipvs_failure_domain": "pair-1"}), ("b", {})]) == {"a": "pair-1"}
    for bad in (3, "", "two words", ["pair"], True):
        with pytest.raises(ConfigError, match=r"host a: ipvs_failure_domain: must be a name"):
            failure_domains([("a", {"ipvs_failure_domain": bad})])


# -- the plan ---------------------------------------------------------------------------------


def test_count_and_percent_waves_defer_the_second_member():
    plan = plan_waves(HOSTS, parse_waves("canary,100%"), domains=PAIR)
    # 100% would take both directors: the second waits for the next wave, the others go on
    assert hosts_of(plan) == [["c1"], ["lvs-a", "n1", "n2"], ["lvs-b"]]
    plan = plan_waves(HOSTS, parse_waves("2"), domains=PAIR)
    assert hosts_of(plan) == [["c1", "lvs-a"], ["lvs-b", "n1"], ["n2"]]
    # without domains, the same specs take them together
    assert hosts_of(plan_waves(HOSTS, parse_waves("canary,100%"))) == [
        ["c1"],
        ["lvs-a", "lvs-b", "n1", "n2"],
    ]


def test_a_group_wave_holding_a_whole_domain_is_refused():
    with pytest.raises(ConfigError) as e:
        plan_waves(HOSTS, parse_waves("canary,dirs,100%"), domains=PAIR)
    msg = str(e.value)
    assert "wave 2 (dirs)" in msg and "lvs-a, lvs-b" in msg and "failure domain pair" in msg


def test_group_wave_after_a_member_was_taken_is_refused_too():
    hosts = [("lvs-a", ("canary", "dirs")), ("lvs-b", ("dirs",))]
    # the canary takes lvs-a, the group wave only lvs-b: one member per wave, planned
    assert hosts_of(plan_waves(hosts, parse_waves("canary,dirs"), domains=PAIR)) == [
        ["lvs-a"],
        ["lvs-b"],
    ]


def test_domains_of_other_hosts_share_waves():
    domains = {"a1": "A", "a2": "A", "b1": "B", "b2": "B"}
    hosts = [(h, ()) for h in ("a1", "a2", "b1", "b2")]
    assert hosts_of(plan_waves(hosts, parse_waves("100%"), domains=domains)) == [
        ["a1", "b1"],
        ["a2", "b2"],
    ]


# -- VRRP state read from a host -----------------------------------------------------------


def test_vips_of_each_instance_from_keepalived_conf():
    assert parse_vips(CONF) == {"VI_1": ("10.0.9.100", "10.0.10.1"), "VI_2": ("192.0.2.7",)}


def addrs(*ips):
    return "\n".join(f"3: eth1    inet {ip}/24 brd 10.0.9.255 scope global eth1" for ip in ips)


def test_vrrp_state_from_the_probe_output():
    out = CONF + ROLE_MARK + "\n" + addrs("10.0.9.11", "10.0.9.100", "10.0.10.1")
    st = vrrp_state(out)
    assert st.held == {"VI_1": "all", "VI_2": "none"} and st.master
    st = vrrp_state(CONF + ROLE_MARK + "\n" + addrs("10.0.9.12"))
    assert st.held == {"VI_1": "none", "VI_2": "none"} and not st.master
    assert vrrp_state(CONF + ROLE_MARK + "\n" + addrs("10.0.9.100")).held["VI_1"] == "part"
    assert "no virtual_ipaddress" in vrrp_state("global_defs {\n}\n" + ROLE_MARK + "\n").error


@pytest.mark.parametrize("shell", ["sh", "bash"])
def test_the_read_expands_includes_in_place_as_keepalived(tmp_path, shell):
    """Instances in included files (a glob relative to the including file's directory, an
    absolute path, nested) are read; a last line without newline too; an include loop is an
    error, not a hang."""
    (tmp_path / "conf.d" / "sub").mkdir(parents=True)
    (tmp_path / "keepalived.conf").write_text(
        "global_defs {\n  router_id x  # include nothing\n}\n"
        "include conf.d/*.conf\n"
        f"include {tmp_path}/other.conf"  # no newline at the end
    )
    (tmp_path / "conf.d" / "10-vi1.conf").write_text(
        "vrrp_instance VI_1 {\n  virtual_ipaddress {\n    10.0.9.100/24 dev eth1\n"
        "    include sub/vips\n  }\n}\n"
    )
    (tmp_path / "conf.d" / "sub" / "vips").write_text("10.0.10.1/24 dev eth1\n")
    (tmp_path / "conf.d" / "20-none.conf.disabled").write_text("vrrp_instance VI_9 {\n}\n")
    (tmp_path / "other.conf").write_text(
        "vrrp_instance VI_2 {\n  virtual_ipaddress {\n    192.0.2.7\n  }\n}\n"
    )
    cmd = role_command(str(tmp_path / "keepalived.conf"))
    r = subprocess.run([shell, "-c", cmd], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert parse_vips(r.stdout.partition(ROLE_MARK)[0]) == {
        "VI_1": ("10.0.9.100", "10.0.10.1"),
        "VI_2": ("192.0.2.7",),
    }
    (tmp_path / "conf.d" / "30-loop.conf").write_text("include 30-loop.conf\n")
    r = subprocess.run([shell, "-c", cmd], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "include nested deeper than 8" in r.stderr
    assert ROLE_MARK not in r.stdout
    missing = role_command(str(tmp_path / "nothing.conf"))
    r = subprocess.run([shell, "-c", missing], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and ROLE_MARK not in r.stdout


def state(*held_vi1: str) -> VrrpState:
    return VrrpState({"VI_1": held_vi1[0]}) if held_vi1 else VrrpState({}, "unreadable")


def test_domain_problems_split_brain_none_and_partial():
    assert domain_problems("pair", {"lvs-a": state("all"), "lvs-b": state("none")}) == []
    split = domain_problems("pair", {"lvs-a": state("all"), "lvs-b": state("all")})
    assert split and "split brain" in split[0] and "lvs-a, lvs-b" in split[0]
    none = domain_problems("pair", {"lvs-a": state("none"), "lvs-b": state("none")})
    assert none and "no member holds" in none[0]
    part = domain_problems("pair", {"lvs-a": state("part"), "lvs-b": state("none")})
    assert part and "part of" in part[0]
    bad = domain_problems("pair", {"lvs-a": state(), "lvs-b": state("all")})
    assert bad and "lvs-a" in bad[0] and "unreadable" in bad[0]


def test_vrrp_order_backups_first():
    st = {"lvs-a": state("all"), "lvs-b": state("none")}
    assert vrrp_order(["lvs-a", "lvs-b"], st) == ["lvs-b", "lvs-a"]
    assert vrrp_order(["lvs-b", "lvs-a"], st) == ["lvs-b", "lvs-a"]


# -- the engine: roles read before each wave ------------------------------------------------


class FakeRunner:
    def __init__(self, fail_gate=()):
        self.calls: list[tuple[str, tuple[str, ...]]] = []
        self.fail_gate = set(fail_gate)

    def _step(self, what: str, hosts: Sequence[str], bad=()) -> StepResult:
        self.calls.append((what, tuple(hosts)))
        return StepResult({h: Outcome(h not in bad, f"{what} failed") for h in hosts}, 0.0)

    def deploy(self, hosts: Sequence[str], progress: Progress) -> StepResult:
        return self._step("deploy", hosts)

    def gate(self, hosts: Sequence[str], progress: Progress) -> StepResult:
        return self._step("gate", hosts, self.fail_gate)

    def rollback(self, hosts: Sequence[str], progress: Progress) -> StepResult:
        return self._step("rollback", hosts)

    def plan(self, hosts: Sequence[str], progress: Progress) -> dict[str, PlannedHost]:
        return {h: PlannedHost() for h in hosts}


class Roles:
    """VRRP states per read: a list of {host: held} mappings, one per read (the last repeats)."""

    def __init__(self, *reads: dict[str, str]):
        self.reads = list(reads)
        self.asked: list[tuple[str, ...]] = []

    def __call__(self, hosts: Sequence[str]) -> dict[str, VrrpState]:
        self.asked.append(tuple(hosts))
        now = self.reads.pop(0) if len(self.reads) > 1 else self.reads[0]
        return {h: state(now[h]) if now.get(h) else state() for h in hosts}


class Clock:
    """A clock that the fake sleep moves on: settle waits cost no real time."""

    def __init__(self) -> None:
        self.now = 0.0

    def sleep(self, s: float) -> None:
        self.now += s


def run_pair(tmp_path: Path, roles: Roles, spec="canary,1", runner=None, previous=None):
    plan = plan_waves(HOSTS[:3], parse_waves(spec), domains=PAIR)
    runner = runner or FakeRunner()
    clock = Clock()
    r = Rollout(
        plan,
        runner,
        Journal(tmp_path / "j.jsonl"),
        domains=DomainOrder(PAIR, roles, sleep=clock.sleep, clock=lambda: clock.now),
        previous=previous,
    )
    return r.run(), runner


def deployed(runner):
    return [hs for what, hs in runner.calls if what == "deploy"]


def test_the_backup_goes_before_the_master(tmp_path):
    # planned: wave 2 lvs-a, wave 3 lvs-b; lvs-a is the master: lvs-b takes wave 2
    res, runner = run_pair(tmp_path, Roles({"lvs-a": "all", "lvs-b": "none"}))
    assert res.outcome == COMPLETED
    assert deployed(runner) == [("c1",), ("lvs-b",), ("lvs-a",)]
    assert [w.hosts for w in res.planned] == [("c1",), ("lvs-b",), ("lvs-a",)]
    assert res.states() == {"c1": "new-verified", "lvs-a": "new-verified", "lvs-b": "new-verified"}
    recs = [json.loads(x) for x in (tmp_path / "j.jsonl").read_text().splitlines()]
    order = [r for r in recs if r["event"] == "domain"]
    assert order[0]["wave"] == 2 and order[0]["takes"] == ["lvs-b"]
    assert order[0]["roles"] == {"lvs-a": "master", "lvs-b": "backup"}
    assert read_journal(tmp_path / "j.jsonl").hosts["lvs-b"].wave == 2


def test_planned_order_kept_when_the_backup_is_first(tmp_path):
    res, runner = run_pair(tmp_path, Roles({"lvs-a": "none", "lvs-b": "all"}))
    assert deployed(runner) == [("c1",), ("lvs-a",), ("lvs-b",)]


def test_roles_are_read_again_before_each_wave(tmp_path):
    # before wave 2 lvs-b is master (lvs-a goes first); before wave 3 neither holds the VIPs
    # (a failover gone wrong during wave 2), read once a second for 15 s: wave 3 is refused
    roles = Roles({"lvs-a": "none", "lvs-b": "all"}, {"lvs-a": "none", "lvs-b": "none"})
    res, runner = run_pair(tmp_path, roles)
    assert deployed(runner) == [("c1",), ("lvs-a",)]
    assert roles.asked == [("lvs-a", "lvs-b")] * 17
    assert res.outcome == HALTED and res.halted_at == 3


def test_a_domain_in_transition_is_read_again_until_it_settles(tmp_path):
    # a failover under way as wave 2 starts: the VIPs on neither director, then on one
    # director only in part, then on lvs-b: lvs-a (the backup now) goes first
    roles = Roles(
        {"lvs-a": "none", "lvs-b": "none"},
        {"lvs-a": "none", "lvs-b": "part"},
        {"lvs-a": "none", "lvs-b": "all"},
    )
    res, runner = run_pair(tmp_path, roles)
    assert res.outcome == COMPLETED
    assert deployed(runner) == [("c1",), ("lvs-a",), ("lvs-b",)]
    recs = [json.loads(x) for x in (tmp_path / "j.jsonl").read_text().splitlines()]
    order = [r for r in recs if r["event"] == "domain"]
    assert order[0]["waited_s"] == 2.0 and order[0]["takes"] == ["lvs-a"]


@pytest.mark.parametrize(
    ("held", "why"),
    [
        ({"lvs-a": "all", "lvs-b": "all"}, "split brain"),
        ({"lvs-a": "none", "lvs-b": "none"}, "no member holds"),
        ({"lvs-a": "all"}, "lvs-b: unreadable"),
    ],
)
def test_split_brain_or_no_master_refuses_the_wave(tmp_path, held, why):
    res, runner = run_pair(tmp_path, Roles(held))
    assert res.outcome == HALTED and res.halted_at == 2
    assert deployed(runner) == [("c1",)]  # the directors untouched
    assert res.states()["lvs-a"] == res.states()["lvs-b"] == J.OLD
    recs = [json.loads(x) for x in (tmp_path / "j.jsonl").read_text().splitlines()]
    refused = [r for r in recs if r["event"] == "wave" and not r["passed"]]
    assert refused and why in refused[0]["refused"]
    assert why in res.to_dict()["waves"][-1]["refused"]


def test_resume_after_the_backup_takes_the_master(tmp_path):
    runner = FakeRunner(fail_gate={"lvs-a"})
    res, _ = run_pair(tmp_path, Roles({"lvs-a": "all", "lvs-b": "none"}), runner=runner)
    assert res.outcome == HALTED and deployed(runner) == [("c1",), ("lvs-b",), ("lvs-a",)]
    view = read_journal(tmp_path / "j.jsonl")
    runner2 = FakeRunner()
    res2, _ = run_pair(
        tmp_path, Roles({"lvs-a": "all", "lvs-b": "none"}), runner=runner2, previous=view
    )
    assert res2.outcome == COMPLETED
    assert deployed(runner2) == [("lvs-a",)]  # c1 and lvs-b verified: skipped


# -- the CLI: bad data and refused plans exit 2 before any host is touched ----------------------

PAIR_INVENTORY = """
canary = [("c1", {"ipvs_host_class": "k8s_node"})]
director_pair = [
    ("lvs-a", {"ipvs_host_class": "k8s_node", "ipvs_failure_domain": DOMAIN}),
    ("lvs-b", {"ipvs_host_class": "k8s_node", "ipvs_failure_domain": DOMAIN}),
]
"""


@pytest.fixture
def pair_cli(tmp_path, monkeypatch):
    from ipvs_fleet.cli import main
    from ipvs_fleet.rollout import cli as rollout_cli

    made: list[FakeRunner] = []

    def runner(**_: object) -> FakeRunner:
        made.append(FakeRunner())
        return made[-1]

    monkeypatch.setattr(rollout_cli, "PyinfraRunner", runner)
    monkeypatch.setattr(rollout_cli, "ssh_connector", lambda *a, **k: object())
    roles = Roles({"lvs-a": "all", "lvs-b": "none"})
    monkeypatch.setattr(rollout_cli, "state_reader", lambda connect: roles)

    def run(domain: str, waves: str, *args: str) -> tuple[int, list[FakeRunner]]:
        inv = tmp_path / "inv.py"
        inv.write_text(PAIR_INVENTORY.replace("DOMAIN", domain))
        j = str(tmp_path / "j.jsonl")
        return main(["rollout", str(inv), "--journal", j, "--waves", waves, *args]), made

    return run


def test_cli_bad_failure_domain_exits_2_touching_nothing(pair_cli, capsys):
    rc, made = pair_cli("['pair']", "canary,100%")
    assert rc == 2 and made == []
    assert "host lvs-a: ipvs_failure_domain: must be a name" in capsys.readouterr().err


def test_cli_group_wave_over_a_domain_exits_2_touching_nothing(pair_cli, capsys):
    rc, made = pair_cli("'pair'", "canary,director_pair")
    assert rc == 2 and made == []
    err = capsys.readouterr().err
    assert "wave 2 (director_pair) would take lvs-a, lvs-b of failure domain pair" in " ".join(
        err.split()
    )


def test_cli_pair_rollout_backup_first(pair_cli, capsys):
    rc, made = pair_cli("'pair'", "canary,100%")
    assert rc == 0
    assert deployed(made[0]) == [("c1",), ("lvs-b",), ("lvs-a",)]
    assert "failure domain pair" in capsys.readouterr().err


# -- the pair lab's inventory data: the domain and the drain hooks, valid host data --------------


def test_pair_lab_hosts_carry_the_domain_and_the_drain_hooks(tmp_path):
    from types import SimpleNamespace

    from ipvs_fleet.ansible_inventory import lab_inventory
    from ipvs_fleet.lab.inventory import host_data
    from ipvs_fleet.policy import load_policy

    def lab_host(name, groups):
        return SimpleNamespace(
            name=name,
            host_class="k8s_node",
            groups=groups,
            release="bookworm",
            kernel_release="6.1.0-x",
            kernel_version="#1",
            port=2222,
        )

    lab = SimpleNamespace(
        hosts={
            "lvs-a": lab_host("lvs-a", ["k8s_nodes", "director_pair"]),
            "n1": lab_host("n1", ["k8s_nodes"]),
        },
        client_key=tmp_path / "key",
        known_hosts=tmp_path / "known_hosts",
    )
    data = host_data(lab, "lvs-a", class_data={})  # type: ignore[arg-type]
    assert data["ipvs_failure_domain"] == "director_pair"
    assert data["ipvs_pre_activate"][0] == "echo -100 > /etc/keepalived/drain"
    assert "10.0.9.100" in data["ipvs_pre_activate"][1]
    assert data["ipvs_post_activate"] == ["echo 0 > /etc/keepalived/drain"]
    assert "ipvs_failure_domain" not in host_data(lab, "n1", class_data={})  # type: ignore[arg-type]
    settings = load_policy().for_host("lvs-a", {k: v for k, v in data.items() if k[:5] == "ipvs_"})
    assert settings.pre_activate == tuple(data["ipvs_pre_activate"])
    doc = lab_inventory(lab)  # type: ignore[arg-type]
    assert doc["all"]["children"]["director_pair"]["vars"]["ipvs_failure_domain"] == "director_pair"


def test_cli_dry_shows_the_domain_and_who_goes_first(pair_cli, capsys):
    rc, made = pair_cli("'pair'", "canary,100%", "--dry")
    assert rc == 0 and deployed(made[0]) == []
    out = " ".join(capsys.readouterr().out.split())
    assert "failure domain pair: lvs-a (wave 2), lvs-b (wave 3)" in out
    assert "now lvs-a master, lvs-b backup: lvs-b goes first" in out
