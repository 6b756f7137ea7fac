"""Terminal output of a rollout (progress per wave, host and step; final tables) and its JSON."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ipvs_fleet.console import console as make_console
from ipvs_fleet.rollout import journal as J
from ipvs_fleet.rollout.config import Wave
from ipvs_fleet.rollout.domains import DomainOrder, domain_problems, vrrp_order
from ipvs_fleet.rollout.engine import UI, RolloutResult
from ipvs_fleet.rollout.runner import PlannedHost

STYLE = {
    J.NEW_VERIFIED: "green",
    J.OLD: "dim",
    J.REPORT_ROLLED_BACK: "yellow",
    J.FAILED_UNKNOWN: "bold red",
}


class RichUI(UI):
    """One line per wave step and per host verdict, on stderr."""

    def __init__(self, console: Console | None = None, verbose: bool = False) -> None:
        self.console = console or make_console(stderr=True)
        self.verbose = verbose
        self.total = 0
        self._last_step = ""

    def wave_start(self, wave: Wave, todo: Sequence[str], total: int) -> None:
        self.total = total
        skip = len(wave.hosts) - len(todo)
        extra = f", {skip} already verified" if skip else ""
        self.console.rule(
            f"[bold]wave {wave.index}/{total}[/] ({wave.spec}): {len(wave.hosts)} host(s){extra}, "
            f"max fail {wave.max_fail_percent:g}%"
        )

    def step(self, wave: Wave, step: str, host: str = "") -> None:
        if host:
            if self.verbose:
                self.console.print(f"  [dim]w{wave.index}[/] {host}: {step}")
            return
        if step != self._last_step:
            self._last_step = step
            self.console.print(f"  [cyan]w{wave.index}[/] {step}")

    def host_done(self, wave: Wave, host: str, state: str, reason: str = "") -> None:
        colour = {J.VERIFIED: "green", J.ROLLED_BACK: "yellow", J.REFUSED: "yellow"}.get(
            state, "red"
        )
        why = f" - {reason[:160]}" if reason else ""
        self.console.print(f"  [cyan]w{wave.index}[/] {host}: [{colour}]{state}[/]{why}")

    def wave_end(self, wave: Wave, passed: bool, failed: Sequence[str]) -> None:
        n = len(wave.hosts)
        if passed:
            self.console.print(
                f"  [green]wave {wave.index} passed[/] ({len(failed)}/{n} failed, "
                f"allowed {wave.max_fail_percent:g}%)"
            )
        else:
            self.console.print(
                f"  [bold red]wave {wave.index} FAILED[/] ({len(failed)}/{n} failed, allowed "
                f"{wave.max_fail_percent:g}%): rollout halted, later waves untouched"
            )

    def message(self, text: str) -> None:
        self.console.print(f"  {text}")


def print_plan(
    waves: Sequence[Wave],
    console: Console,
    plans: Mapping[str, PlannedHost] | None = None,
    states: dict[str, str] | None = None,
) -> None:
    """The waves in order, their hosts, then each wave's pending changes per host (pyinfra's
    dry run): hosts with the same changes share one entry; refused and unplanned hosts are
    named."""
    t = Table(title="Rollout plan")
    for col in ("wave", "spec", "hosts", "max fail", "soak", "pending"):
        t.add_column(col)
    for w in waves:
        names = (
            ", ".join(w.hosts)
            if len(w.hosts) <= 6
            else (", ".join(w.hosts[:3]) + f" ... {w.hosts[-1]} ({len(w.hosts)})")
        )
        if states:
            done = sum(1 for h in w.hosts if states.get(h) == J.VERIFIED)
            if done:
                names += f" [green]({done} verified, skipped on resume)[/]"
        pending = "-" if plans is None else wave_summary(w.hosts, plans)
        t.add_row(
            str(w.index),
            w.spec,
            names,
            f"{w.max_fail_percent:g}%",
            f"{w.soak_seconds:g} s",
            pending,
        )
    console.print(t)
    if plans is None:
        return
    for w in waves:
        console.print(f"[bold]{w.name}[/]", soft_wrap=True)
        for line in wave_changes(w.hosts, plans):
            console.print(f"  {line}", soft_wrap=True)


def _verdict(p: PlannedHost | None) -> str:
    if p is None:
        return "unplanned"
    if p.refused:
        return "refused"
    if p.error:
        return "unplanned"
    return "changes" if p.changes else "converged"


def wave_summary(hosts: Sequence[str], plans: Mapping[str, PlannedHost]) -> str:
    """ "2 to change, 1 converged, 1 REFUSED" for the plan table."""
    counts: dict[str, int] = {}
    for h in hosts:
        v = _verdict(plans.get(h))
        counts[v] = counts.get(v, 0) + 1
    words = {
        "changes": "{} to change",
        "converged": "[green]{} converged[/]",
        "refused": "[red]{} REFUSED[/]",
        "unplanned": "[red]{} not planned[/]",
    }
    return ", ".join(words[k].format(counts[k]) for k in words if k in counts)


def _host_list(hosts: Sequence[str]) -> str:
    if len(hosts) <= 4:
        return ", ".join(hosts)
    return f"{', '.join(hosts[:2])} ... {hosts[-1]} ({len(hosts)} hosts)"


def wave_changes(hosts: Sequence[str], plans: Mapping[str, PlannedHost]) -> list[str]:
    """Rich-markup lines: per group of hosts with the same verdict, what it is."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for h in hosts:
        p = plans.get(h) or PlannedHost(error="not in the dry run")
        if p.refused:
            key: tuple[str, ...] = ("[red]REFUSED: " + escape(p.refused) + "[/]",)
        elif p.error:
            key = ("[red]could not be planned: " + escape(p.error) + "[/]",)
        elif p.changes:
            key = tuple("- " + escape(c) for c in p.changes)
        else:
            key = ("[green]nothing (converged)[/]",)
        groups.setdefault(key, []).append(h)
    out = []
    for key, hs in groups.items():
        if len(key) == 1 and not key[0].startswith("- "):
            out.append(f"[bold]{escape(_host_list(hs))}[/]: {key[0]}")
            continue
        out.append(f"[bold]{escape(_host_list(hs))}[/]:")
        out += [f"  {line}" for line in key]
    return out


def print_summary(result: RolloutResult, console: Console) -> None:
    """Per-wave table, then every host with its state."""
    wt = Table(title=f"Rollout {result.outcome} in {result.seconds:.1f} s")
    for col in ("wave", "spec", "hosts", "failed", "rolled back", "result", "deploy s", "gate s"):
        wt.add_column(col)
    for w in result.waves:
        res = "[green]passed[/]" if w.passed else "[bold red]FAILED[/]"
        wt.add_row(
            str(w.index),
            w.spec,
            str(len(w.hosts)),
            str(len(w.failed)),
            str(len(w.rolled_back)),
            res,
            f"{w.seconds.get('deploy', 0):.1f}",
            f"{w.seconds.get('gate', 0):.1f}",
        )
    for pw in result.planned[len(result.waves) :]:
        wt.add_row(
            str(pw.index), pw.spec, str(len(pw.hosts)), "-", "-", "[dim]not started[/]", "-", "-"
        )
    console.print(wt)
    ht = Table(title="Hosts")
    for col in ("host", "wave", "state", "detail"):
        ht.add_column(col)
    states = result.states()
    for pw in result.planned:
        for h in pw.hosts:
            s = states[h]
            rec = result.hosts.get(h)
            ht.add_row(h, str(pw.index), f"[{STYLE[s]}]{s}[/]", (rec.detail if rec else "")[:120])
    console.print(ht)
    counts: dict[str, int] = {}
    for s in states.values():
        counts[s] = counts.get(s, 0) + 1
    console.print(", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))


def write_json(result: RolloutResult, path: Path | str, **extra: Any) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({**extra, **result.to_dict()}, indent=2) + "\n")


def print_domains(
    order: DomainOrder, waves: Sequence[Wave], console: Console, read: bool = True
) -> None:
    """The failure domains of the plan, one line each: their waves and, when `read`, the
    VRRP roles now (which member goes first, or why its wave would be refused)."""
    wave_of = {h: w.index for w in waves for h in w.hosts}
    domains: dict[str, list[str]] = {}
    for h, d in order.members.items():
        if h in wave_of:
            domains.setdefault(d, []).append(h)
    for d, members in sorted(domains.items()):
        members.sort(key=lambda h: wave_of[h])
        where = ", ".join(f"{h} (wave {wave_of[h]})" for h in members)
        line = f"failure domain {d}: {where}: one member per wave, the VRRP backup first"
        if read:
            states = order.read(members)
            bad = domain_problems(d, states)
            roles = ", ".join(f"{h} {states[h].role}" for h in members)
            line += (
                f"; now {roles}: " + ("[red]refused: " + escape("; ".join(bad)) + "[/]")
                if bad
                else f"; now {roles}: {vrrp_order(members, states)[0]} goes first"
            )
        else:
            line += " (roles read before each wave)"
        console.print(line, soft_wrap=True)
