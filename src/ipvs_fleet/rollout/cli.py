"""`ipvs-fleet rollout inventory/<env>.py`: the deploy in waves; gates, halt, rollback, resume."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any

from rich.console import Console

from ipvs_fleet.errors import ConfigError
from ipvs_fleet.policy import REPO, load_policy
from ipvs_fleet.rollout.config import (
    ROLLOUT_FILE,
    RolloutConfig,
    Wave,
    load_config,
    parse_waves,
    plan_waves,
)
from ipvs_fleet.rollout.engine import COMPLETED, Rollout
from ipvs_fleet.rollout.journal import Journal, JournalView, read_journal
from ipvs_fleet.rollout.report import (
    RichUI,
    changes_by_host,
    print_plan,
    print_summary,
    write_json,
)
from ipvs_fleet.rollout.runner import PyinfraRunner

EPILOG = """\
waves: a group name (its hosts), a host count, or N% of the hosts outside the group waves;
the last entry repeats until every host is in a wave (as Ansible's serial). Host order is the
inventory's. Exit codes: 0 completed, 1 halted (a wave failed its gate), 2 bad input.
"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "rollout",
        help="roll the deploy out in waves with gates, halt, rollback and resume",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inventory", type=Path, help="pyinfra inventory file, e.g. inventory/lab.py")
    p.add_argument("--waves", help="wave list, e.g. canary,1,10%%,100%% (default: the policy's)")
    p.add_argument("--config", type=Path, default=None,
                   help=f"rollout policy YAML (default: {ROLLOUT_FILE.relative_to(REPO)})")
    p.add_argument("--plan", action="store_true",
                   help="print the waves and what each would change (dry run); touch nothing")
    p.add_argument("--resume", action="store_true",
                   help="continue the journal's rollout, skipping hosts already verified")
    p.add_argument("--journal", type=Path,
                   help="journal file (default: reports/rollout/<inventory>.jsonl)")
    p.add_argument("--json", type=Path, dest="json_out", help="write the JSON report here")
    p.add_argument("--soak", type=float, help="seconds to wait after each wave's deploy")
    p.add_argument("--max-fail-percent", type=float, help="override the policy's default")
    p.add_argument("--no-rollback", action="store_true",
                   help="leave a failed wave's hosts as they are (report them failed-unknown)")
    p.add_argument("--log-dir", type=Path, help="pyinfra and gate logs (default: next to journal)")
    p.add_argument("-v", "--verbose", action="store_true", help="print each host's pyinfra lines")
    p.set_defaults(func=run)  # fmt: skip


def default_journal(inventory: Path) -> Path:
    return REPO / "reports" / "rollout" / f"{inventory.stem}.jsonl"


def load_hosts(inventory: Path) -> list[tuple[str, tuple[str, ...], dict[str, Any]]]:
    """(name, groups, data) of each inventory host, in file order (ConfigError if unusable)."""
    from ipvs_fleet.compliance.inventory import load_inventory

    return [(h.name, tuple(h.groups), dict(h.data)) for h in load_inventory(inventory)]


def check_policy(hosts: list[tuple[str, tuple[str, ...], dict[str, Any]]]) -> None:
    """Every host's class settings must be valid before any host is touched."""
    policy = load_policy()
    for name, _, data in hosts:
        policy.for_host(name, {k: v for k, v in data.items() if str(k).startswith("ipvs_")})


def effective_config(args: argparse.Namespace) -> RolloutConfig:
    cfg = load_config(args.config)
    if args.waves:
        cfg = dataclasses.replace(cfg, waves=parse_waves(args.waves))
    if args.soak is not None:
        if args.soak < 0:
            raise ConfigError("--soak: must be >= 0 seconds")
        cfg = dataclasses.replace(cfg, soak_seconds=args.soak,
                                  waves=tuple(dataclasses.replace(w, soak_seconds=None)
                                              for w in cfg.waves))  # fmt: skip
    if args.max_fail_percent is not None:
        if not 0 <= args.max_fail_percent <= 100:
            raise ConfigError("--max-fail-percent: must be 0..100")
        cfg = dataclasses.replace(cfg, max_fail_percent=args.max_fail_percent)
    for f in (cfg.deploy, cfg.rollback):
        if not (REPO / f).is_file() and not Path(f).is_file():
            raise ConfigError(f"{cfg.source}: deploy file {f} not found")
    return cfg


def resumed_plan(view: JournalView, fresh: list[Wave], names: set[str], where: Path) -> list[Wave]:
    """The journal's waves (host lists as first planned), with the current thresholds."""
    planned = {h for _, hs in view.waves for h in hs}
    gone = sorted(planned - names)
    new = sorted(names - planned)
    if gone or new:
        raise ConfigError(
            f"{where}: the inventory changed since this rollout started "
            f"(gone: {', '.join(gone) or '-'}; new: {', '.join(new) or '-'}); "
            "finish it with the old inventory or start a new journal"
        )
    out = []
    for i, (spec, hs) in enumerate(view.waves):
        same = i < len(fresh) and list(fresh[i].hosts) == hs
        mfp = fresh[i].max_fail_percent if same else fresh[-1].max_fail_percent
        soak = fresh[i].soak_seconds if same else fresh[-1].soak_seconds
        out.append(Wave(i + 1, spec, tuple(hs), mfp, soak))
    return out


def run(args: argparse.Namespace) -> int:
    console = Console(stderr=True, highlight=False)
    inv: Path = args.inventory
    if not inv.is_file():
        raise ConfigError(f"{inv}: inventory file not found")
    cfg = effective_config(args)
    hosts = load_hosts(inv)
    check_policy(hosts)
    waves = plan_waves(
        [(n, g) for n, g, _ in hosts], cfg.waves,
        max_fail_percent=cfg.max_fail_percent, soak_seconds=cfg.soak_seconds,
    )  # fmt: skip
    jpath = args.journal or default_journal(inv)
    view = read_journal(jpath)
    if args.resume:
        if view.runs == 0:
            raise ConfigError(f"{jpath}: no journal to resume (run without --resume first)")
        waves = resumed_plan(view, waves, {n for n, _, _ in hosts}, jpath)
    elif view.runs and not args.plan:
        raise ConfigError(
            f"{jpath}: a journal of an earlier rollout exists (outcome: {view.outcome or 'none'}); "
            "continue it with --resume, or give another --journal"
        )
    log_dir = args.log_dir or jpath.with_suffix(".logs")
    env = dict(os.environ)
    runner = PyinfraRunner(
        inventory=inv.absolute(),
        deploy_file=cfg.deploy,
        rollback_file=cfg.rollback,
        rollback_data=cfg.rollback_data,
        use_checks=cfg.gate.checks,
        check_args=cfg.gate.check_args,
        gate_timeout=cfg.gate.timeout_seconds,
        latency_hosts=cfg.gate.latency_hosts,
        log_dir=log_dir,
        env=env,
    )
    if args.plan:
        states = {h: r.state for h, r in view.hosts.items()} if args.resume else None
        console.print(f"[bold]Plan[/] for {inv}: {len(hosts)} host(s) in {len(waves)} wave(s); "
                      "dry run of the deploy (nothing is changed)...")  # fmt: skip
        res, doc = runner.plan([h for w in waves for h in w.hosts], lambda h, s: None)
        print_plan(waves, Console(highlight=False), changes_by_host(doc) if doc else None, states)
        bad = {h: o.reason for h, o in res.hosts.items() if not o.ok}
        for h, why in sorted(bad.items()):
            console.print(f"[red]{h}: the deploy would fail: {why}[/]")
        return 0 if not bad else 1
    ui = RichUI(console, verbose=args.verbose)
    journal = Journal(jpath)
    rollout = Rollout(
        waves, runner, journal,
        rollback=cfg.rollback_failed_wave and not args.no_rollback,
        previous=view if args.resume else None, ui=ui, inventory=str(inv),
    )  # fmt: skip
    console.print(f"[bold]Rollout[/] of {inv}: {len(hosts)} host(s) in {len(waves)} wave(s); "
                  f"journal {jpath}")  # fmt: skip
    result = rollout.run()
    print_summary(result, Console(highlight=False))
    if args.json_out:
        write_json(result, args.json_out, inventory=str(inv), journal=str(jpath))
    return 0 if result.outcome == COMPLETED else 1
