"""ipvs-fleet rollout inventory/<env>.py: the deploy in waves; gates, halt, rollback, resume."""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import os
import re
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from ipvs_fleet.build.artifact import artifacts_id
from ipvs_fleet.cliopts import add_dry, add_json
from ipvs_fleet.console import console as make_console
from ipvs_fleet.errors import ConfigError
from ipvs_fleet.policy import load_policy
from ipvs_fleet.resources import ROLLOUT, deploy_file, workdir
from ipvs_fleet.rollout.config import (
    RolloutConfig,
    Wave,
    load_config,
    parse_waves,
    plan_waves,
)
from ipvs_fleet.rollout.domains import DomainOrder
from ipvs_fleet.rollout.engine import COMPLETED, Rollout
from ipvs_fleet.rollout.held import HeldConnections, ssh_connector
from ipvs_fleet.rollout.journal import Journal, JournalView, archive, read_journal
from ipvs_fleet.rollout.lock import journal_lock
from ipvs_fleet.rollout.report import (
    RichUI,
    print_domains,
    print_plan,
    print_summary,
    write_json,
)
from ipvs_fleet.rollout.runner import PyinfraRunner, require_pyinfra
from ipvs_fleet.rollout.vrrp import state_reader
from ipvs_fleet.validation import failure_domains

EPILOG = """\
waves: a group name (its hosts), a host count, or N% of the hosts outside the group waves;
the last entry repeats until every host is in a wave (as Ansible's serial). Host order is the
inventory's. A journal whose rollout completed is archived (<journal stem>.<UTC time>.jsonl)
and a new rollout starts; an unfinished one is continued with --resume or archived with --new.
One rollout at a time per journal: a second one refuses (exit 2) naming the running one.
Password data (--data _sudo_password=..., ssh_password=...) reaches pyinfra by environment,
not its command line, and is masked in every log and output.
Exit codes: 0 completed (--dry: every host can be deployed), 1 halted (a wave failed its
gate; --dry: a host would be refused or could not be planned), 2 bad input.
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
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"rollout policy YAML (default: the policy directory's {ROLLOUT}, else "
        "the packaged one)",
    )
    add_dry(
        p,
        "print the waves and each host's pending changes (pyinfra's dry run); touch nothing",
        old=("--plan",),
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the journal's unfinished rollout, skipping hosts already verified",
    )
    p.add_argument(
        "--new",
        action="store_true",
        help="archive the journal of an unfinished rollout and start a new one",
    )
    p.add_argument(
        "--limit",
        action="append",
        default=[],
        metavar="HOSTS",
        help="only these hosts: names, globs or group names, comma-separated or "
        "repeated (as pyinfra's --limit); --resume keeps the journal's",
    )
    p.add_argument(
        "--journal", type=Path, help="journal file (default: reports/rollout/<inventory>.jsonl)"
    )
    add_json(p, "write the JSON report here", dest="json_out")
    p.add_argument("--soak", type=float, help="seconds to wait after each wave's deploy")
    p.add_argument("--max-fail-percent", type=float, help="override the policy's default")
    p.add_argument(
        "--no-rollback",
        action="store_true",
        help="leave a failed wave's hosts as they are (report them failed-unknown)",
    )
    p.add_argument("--log-dir", type=Path, help="pyinfra and gate logs (default: next to journal)")
    p.add_argument("-v", "--verbose", action="store_true", help="print each host's pyinfra lines")
    g = p.add_argument_group(
        "pyinfra options",
        "passed to every pyinfra run: the deploy, the plan, the rollback and the verification gate",
    )
    g.add_argument(
        "--parallel", type=int, metavar="N", help="pyinfra --parallel: at most N hosts at once"
    )
    g.add_argument("--sudo", action="store_true", help="pyinfra --sudo: run operations with sudo")
    g.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="pyinfra --data: override host data of every host (repeatable); the "
        "policy's rollback_data win for the rollback",
    )
    p.set_defaults(func=run)


# --data that says how the hosts are reached: the gate's checks and held connections use it
# too, so that they run as the deploy does.
IDENTITY = re.compile(r"^(ssh_|_sudo)")


def identity_data(data: dict[str, str], sudo: bool) -> dict[str, str]:
    """The deploy's identity as `--data` values: --sudo and the connection's --data."""
    out = {k: v for k, v in data.items() if IDENTITY.match(k)}
    return {**out, "_sudo": "True"} if sudo else out


def default_journal(inventory: Path) -> Path:
    return workdir() / "reports" / "rollout" / f"{inventory.stem}.jsonl"


def load_hosts(inventory: Path) -> list[tuple[str, tuple[str, ...], dict[str, Any]]]:
    """(name, groups, data) of each inventory host, in file order (ConfigError if unusable)."""
    from ipvs_fleet.compliance.inventory import load_inventory

    return [(h.name, tuple(h.groups), dict(h.data)) for h in load_inventory(inventory)]


def check_policy(
    hosts: list[tuple[str, tuple[str, ...], dict[str, Any]]],
    overrides: dict[str, Any] | None = None,
) -> None:
    """Every host's class settings (with --data overrides) must be valid before any host is
    touched."""
    policy = load_policy()
    for name, _, data in hosts:
        merged = {**data, **(overrides or {})}
        policy.for_host(name, {k: v for k, v in merged.items() if str(k).startswith("ipvs_")})


def split_patterns(values: list[str]) -> list[str]:
    """--limit values (repeated and/or comma-separated) as one list of patterns."""
    return [x.strip() for v in values for x in v.split(",") if x.strip()]


def apply_limit(
    hosts: list[tuple[str, tuple[str, ...], dict[str, Any]]], patterns: list[str]
) -> list[tuple[str, tuple[str, ...], dict[str, Any]]]:
    """The hosts a --limit selects, in inventory order: a pattern is a group name (its
    hosts) or a host name glob, as pyinfra's; one that matches nothing is an error."""
    if not patterns:
        return hosts
    chosen: set[str] = set()
    for pat in patterns:
        got = {n for n, gs, _ in hosts if pat in gs} or {
            n for n, _, _ in hosts if fnmatch.fnmatchcase(n, pat)
        }
        if not got:
            raise ConfigError(f"--limit {pat}: matches no host or group of the inventory")
        chosen |= got
    return [h for h in hosts if h[0] in chosen]


def parse_data(items: list[str]) -> tuple[dict[str, str], dict[str, Any]]:
    """--data KEY=VALUE items: (as given, for pyinfra; as pyinfra parses them, for the policy)."""
    from pyinfra_cli.util import parse_cli_arg

    raw: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--data {item}: must be KEY=VALUE")
        raw[key.strip()] = value
    return raw, {k: parse_cli_arg(v) for k, v in raw.items()}


def effective_config(args: argparse.Namespace) -> RolloutConfig:
    cfg = load_config(args.config)
    if args.waves:
        cfg = dataclasses.replace(cfg, waves=parse_waves(args.waves))
    if args.soak is not None:
        if args.soak < 0:
            raise ConfigError("--soak: must be >= 0 seconds")
        cfg = dataclasses.replace(
            cfg,
            soak_seconds=args.soak,
            waves=tuple(dataclasses.replace(w, soak_seconds=None) for w in cfg.waves),
        )
    if args.max_fail_percent is not None:
        if not 0 <= args.max_fail_percent <= 100:
            raise ConfigError("--max-fail-percent: must be 0..100")
        cfg = dataclasses.replace(cfg, max_fail_percent=args.max_fail_percent)
    try:
        return dataclasses.replace(
            cfg, deploy=str(deploy_file(cfg.deploy)), rollback=str(deploy_file(cfg.rollback))
        )
    except ConfigError as e:
        raise ConfigError(f"{cfg.source}: {e}") from None


def resumed_plan(view: JournalView, fresh: list[Wave], names: set[str], where: Path) -> list[Wave]:
    """The journal's waves (host lists as first planned), with the current thresholds."""
    planned = {h for _, hs in view.waves for h in hs}
    gone = sorted(planned - names)
    new = sorted(names - planned)
    if gone or new:
        raise ConfigError(
            f"{where}: the inventory changed since this rollout started "
            f"(gone: {', '.join(gone) or '-'}; new: {', '.join(new) or '-'}); "
            "finish it with the old inventory (and --limit), or start a new rollout with --new"
        )
    out = []
    for i, (spec, hs) in enumerate(view.waves):
        same = i < len(fresh) and list(fresh[i].hosts) == hs
        mfp = fresh[i].max_fail_percent if same else fresh[-1].max_fail_percent
        soak = fresh[i].soak_seconds if same else fresh[-1].soak_seconds
        out.append(Wave(i + 1, spec, tuple(hs), mfp, soak))
    return out


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "?"


def run(args: argparse.Namespace) -> int:
    console = make_console(stderr=True)
    inv: Path = args.inventory
    if not inv.is_file():
        raise ConfigError(f"{inv}: inventory file not found")
    if args.resume and args.new:
        raise ConfigError("--resume continues the journal's rollout, --new archives it: not both")
    if args.parallel is not None and args.parallel < 1:
        raise ConfigError("--parallel: must be at least 1")
    cfg = effective_config(args)
    data, data_values = parse_data(args.data)
    require_pyinfra()
    jpath = args.journal or default_journal(inv)
    if args.dry:  # reads the journal, writes nothing
        return _run(args, console, cfg, data, data_values, jpath)
    with journal_lock(jpath):
        return _run(args, console, cfg, data, data_values, jpath)


def _run(
    args: argparse.Namespace,
    console: Console,
    cfg: RolloutConfig,
    data: dict[str, str],
    data_values: dict[str, Any],
    jpath: Path,
) -> int:
    inv: Path = args.inventory
    view = read_journal(jpath)
    if args.resume:
        if view.runs == 0:
            raise ConfigError(f"{jpath}: no journal to resume (run without --resume first)")
        if view.completed:
            raise ConfigError(
                f"{jpath}: its rollout completed ({_when(view.last_ts)}): nothing to resume; "
                "run without --resume to start a new rollout (the journal is archived)"
            )
    limit = split_patterns(args.limit)
    if args.resume and not limit:
        limit = view.limit  # the resumed rollout's own hosts
    all_hosts = load_hosts(inv)
    hosts = apply_limit(all_hosts, limit)
    check_policy(hosts, data_values)
    domains = failure_domains([(n, d) for n, _, d in hosts])
    waves = plan_waves(
        [(n, g) for n, g, _ in hosts],
        cfg.waves,
        max_fail_percent=cfg.max_fail_percent,
        soak_seconds=cfg.soak_seconds,
        known_groups={g for _, gs, _ in all_hosts for g in gs},
        domains=domains,
    )
    if args.resume:
        waves = resumed_plan(view, waves, {n for n, _, _ in hosts}, jpath)
    elif view.runs and not args.dry and not (view.completed or args.new):
        raise ConfigError(
            f"{jpath}: an unfinished rollout (outcome: {view.outcome or 'none'}, last record "
            f"{_when(view.last_ts)}); continue it with --resume, or archive it and start a new "
            "one with --new"
        )
    log_dir = args.log_dir or jpath.with_suffix(".logs")
    if log_dir == jpath.with_suffix(".logs") and log_dir.is_dir():
        log_dir.chmod(0o700)  # made 0755 by older versions; the logs are the owner's
    env = dict(os.environ)
    pyinfra_args: list[str] = ["--sudo"] if args.sudo else []
    if args.parallel is not None:
        pyinfra_args += ["--parallel", str(args.parallel)]
    identity = identity_data(data, args.sudo)
    # the gate's held connections reach the hosts as the deploy and the checks do
    same = {k: v for k, v in data_values.items() if k in identity}
    connect = (
        ssh_connector([(n, g, {**d, **same}) for n, g, d in hosts], sudo=args.sudo)
        if domains or cfg.gate.held_connections
        else None
    )
    order = DomainOrder(domains, state_reader(connect)) if domains and connect else None
    held = (
        HeldConnections(cfg.gate.held_connections, connect)
        if cfg.gate.held_connections and connect
        else None
    )
    runner = PyinfraRunner(
        inventory=inv.absolute(),
        deploy_file=cfg.deploy,
        rollback_file=cfg.rollback,
        rollback_data=cfg.rollback_data,
        data=data,
        pyinfra_args=tuple(pyinfra_args),
        # the checks judge each host by the data its deploy got (a class or knob given
        # with --data included), reaching it as the deploy does
        gate_data={**data, **identity},
        use_checks=cfg.gate.checks,
        check_args=cfg.gate.check_args,
        gate_timeout=cfg.gate.timeout_seconds,
        host_command_timeout=cfg.host_command_timeout_seconds,
        latency_hosts=cfg.gate.latency_hosts,
        log_dir=log_dir,
        env=env,
        held=held,
    )
    if args.dry:
        states = {h: r.state for h, r in view.hosts.items()} if args.resume else None
        console.print(
            f"[bold]Plan[/] for {inv}: {len(hosts)} host(s) in {len(waves)} wave(s); "
            "pyinfra's dry run of the deploy (nothing is changed)..."
        )
        plans = runner.plan([h for w in waves for h in w.hosts], lambda h, s: None)
        print_plan(waves, make_console(), plans, states)
        if order is not None:
            print_domains(order, waves, make_console())
        bad = {h: p for h, p in plans.items() if not p.ok}
        for h, p in sorted(bad.items()):
            why = (
                f"the deploy would refuse it: {p.refused}"
                if p.refused
                else (f"could not be planned: {p.error}")
            )
            console.print(f"[red]{escape(h)}: {escape(why)}[/]", soft_wrap=True)
        return 0 if not bad else 1
    if view.runs and not args.resume:
        done = archive(jpath, view.last_ts)
        console.print(f"the earlier rollout ({view.outcome or 'unfinished'}) is archived: {done}")
    ui = RichUI(console, verbose=args.verbose)
    journal = Journal(jpath)
    rollout = Rollout(
        waves,
        runner,
        journal,
        rollback=cfg.rollback_failed_wave and not args.no_rollback,
        previous=view if args.resume else None,
        ui=ui,
        inventory=str(inv),
        limit=limit,
        set_id=artifacts_id(Path(env.get("IPVS_FLEET_ARTIFACTS", workdir() / "artifacts"))),
        domains=order,
    )
    console.print(
        f"[bold]Rollout[/] of {inv}: {len(hosts)} host(s) in {len(waves)} wave(s); journal {jpath}"
    )
    if order is not None:  # the plan as the domains shaped it
        print_plan(waves, make_console())
        print_domains(order, waves, make_console(), read=False)
    result = rollout.run()
    print_summary(result, make_console())
    if args.json_out:
        write_json(result, args.json_out, inventory=str(inv), journal=str(jpath))
    return 0 if result.outcome == COMPLETED else 1
