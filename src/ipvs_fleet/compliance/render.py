"""Render check results: terminal summary, JSON, Markdown and HTML reports.

The JUnit XML is pytest's own (`--junitxml`, passed through by `ipvs-fleet check`).
"""

from __future__ import annotations

import base64
import functools
import io
import json
from pathlib import Path
from typing import Any

import jinja2
import yaml

from ipvs_fleet.compliance.model import (
    ERROR,
    FAILED,
    PASSED,
    WAIVED,
    CheckResult,
    by_class,
    by_host,
    exit_code,
    verdict,
)
from ipvs_fleet.compliance.waivers import Waiver
from ipvs_fleet.probe.plot import pyplot
from ipvs_fleet.resources import report_template

FIXES_FILE = Path(__file__).with_name("fixes.yml")


def converge_command(inventory: str | Path, host: str) -> str:
    """The command that brings one host back to its class (the deploy, limited to it)."""
    return f"pyinfra -y {inventory} deploy.py --limit {host}"


@functools.cache
def _fixes() -> dict[str, str]:
    return {str(k): str(v) for k, v in yaml.safe_load(FIXES_FILE.read_text()).items()}


def fix_for(check: str, inventory: str | Path, host: str) -> str:
    """What to do about a failed check on a host (fixes.yml), commands filled in."""
    text = _fixes().get(check, "{converge}")
    return text.format(
        converge=converge_command(inventory, host),
        rollback=f"pyinfra -y {inventory} deploy/rollback.py --limit {host}",
    )


def _converges(check: str) -> bool:
    return "{converge}" in _fixes().get(check, "{converge}")


def _indent(text: str, pad: str = "      ") -> str:
    return "\n".join(pad + line for line in text.splitlines())


def summary(
    results: list[CheckResult],
    inventory: str | Path,
    unused: list[Waiver] | None = None,
    wall: float | None = None,
) -> str:
    """The readable summary: per host class, hosts passing/failing; then every problem."""
    code = exit_code(results)
    out = []
    for cls, hosts in by_class(results).items():
        n_ok = sum(1 for h in hosts if h.status in (PASSED, WAIVED))
        out.append(f"{cls}: {n_ok}/{len(hosts)} hosts compliant")
        for h in hosts:
            bad = [r for r in h.results if r.status != PASSED]
            marks = ", ".join(f"{r.check} {r.status}" for r in bad) or "all checks passed"
            if bad and all(r.status == ERROR for r in h.results):
                marks = "could not check"
            out.append(f"  {h.host:<24} {h.status.upper():<7} {marks}")
    problems = [r for r in results if r.status in (FAILED, ERROR)]
    if problems:
        out.append("")
        out.append("Problems:")
        for h in by_host(problems):
            errors = {r.message for r in h.results if r.status == ERROR}
            if len(errors) == 1 and all(r.status == ERROR for r in h.results):
                # Unreachable: the same reason for every check; say it once.
                out.append(f"  {h.host}: could not check ({len(h.results)} checks)")
                out.append(_indent(errors.pop()))
                continue
            for r in h.results:
                label = "could not check" if r.status == ERROR else "FAILED"
                out.append(f"  {r.host} / {r.check}: {label}")
                out.append(_indent(r.message))
        failed = [r for r in problems if r.status == FAILED]
        if failed:
            out.append("")
            out.append("To fix:")
            for r in failed:
                out.append(f"  {r.host} / {r.check}: {fix_for(r.check, inventory, r.host)}")
    waived = [r for r in results if r.status == WAIVED or (r.waiver and r.waiver.get("expired"))]
    if waived:
        out.append("")
        out.append("Waivers:")
        for r in waived:
            w = r.waiver or {}
            state = "EXPIRED" if w.get("expired") else "waived"
            out.append(
                f"  {r.host} / {r.check}: {state} until {w.get('expires')} "
                f"({w.get('justification')})"
            )
    for uw in unused or []:
        out.append(f"  unused waiver: {uw.where} ({uw.check}) matches no failure")
    n = len(results)
    counts = {s: sum(1 for r in results if r.status == s) for s in (PASSED, FAILED, WAIVED, ERROR)}
    tail = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
    took = f" in {wall:.1f} s" if wall is not None else ""
    out.append("")
    out.append(
        f"{verdict(code)} (exit {code}): {n} checks on {len(by_host(results))} hosts, {tail}{took}"
    )
    return "\n".join(out)


def to_json(
    results: list[CheckResult],
    inventory: str | Path,
    unused: list[Waiver] | None = None,
    wall: float | None = None,
) -> dict[str, Any]:
    code = exit_code(results)
    return {
        "format": 1,
        "inventory": str(inventory),
        "exit_code": code,
        "verdict": verdict(code),
        "wall_seconds": round(wall, 3) if wall is not None else None,
        "classes": {
            cls: {
                "compliant": [h.host for h in hosts if h.status in (PASSED, WAIVED)],
                "not_compliant": [h.host for h in hosts if h.status == FAILED],
                "not_checked": [h.host for h in hosts if h.status == ERROR],
            }
            for cls, hosts in by_class(results).items()
        },
        "results": [
            {
                **r.to_dict(),
                "fix": fix_for(r.check, inventory, r.host) if r.status == FAILED else None,
                "converge": converge_command(inventory, r.host)
                if r.status == FAILED and _converges(r.check)
                else None,
            }
            for r in results
        ],
        "unused_waivers": [w.to_dict() for w in unused or []],
    }


# --- reports -------------------------------------------------------------------------------


def latency_plot(probe: dict[str, Any], title: str) -> bytes | None:
    """A CDF (PNG) of one probe run's per-connection latency, None if it has no attempts
    or matplotlib is not installed (the `plots` extra)."""
    attempts = [a for a in probe.get("attempts") or [] if a.get("error") is None]
    plt = pyplot()
    if not attempts or plt is None:
        return None

    xs = sorted(float(a["total_ms"]) for a in attempts)
    ys = [(i + 1) / len(xs) for i in range(len(xs))]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    ax.step(xs, ys, where="post")
    ax.set_xscale("log")
    ax.set_xlabel("connect + request (ms, log)")
    ax.set_ylabel("fraction of connections")
    ax.axvline(float(probe.get("slow_ms") or 900), color="red", linestyle=":", label="slow")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _plots(results: list[CheckResult]) -> list[tuple[str, bytes]]:
    out = []
    for r in results:
        probe = r.details.get("probe")
        if isinstance(probe, dict):
            png = latency_plot(probe, f"{r.host} ({r.host_class}): {probe.get('scenario', '')}")
            if png:
                out.append((r.host, png))
    return out


def markdown(
    results: list[CheckResult],
    inventory: str | Path,
    out_path: Path,
    unused: list[Waiver] | None = None,
    wall: float | None = None,
) -> str:
    """A Markdown report; latency plots are written next to it as `<stem>-<host>.png`."""
    code = exit_code(results)
    lines = [f"# IPVS fleet compliance: {verdict(code)}", ""]
    lines.append(f"Inventory `{inventory}`, exit code {code}" + (f", {wall:.1f} s" if wall else ""))
    lines += ["", "| host class | compliant | not compliant | not checked |", "|---|---|---|---|"]
    for cls, hosts in by_class(results).items():
        ok = [h.host for h in hosts if h.status in (PASSED, WAIVED)]
        bad = [h.host for h in hosts if h.status == FAILED]
        err = [h.host for h in hosts if h.status == ERROR]
        lines.append(
            f"| {cls} | {', '.join(ok) or '-'} | {', '.join(bad) or '-'} | "
            f"{', '.join(err) or '-'} |"
        )
    checks = list(dict.fromkeys(r.check for r in results))
    lines += ["", "| host | " + " | ".join(checks) + " |", "|---" * (len(checks) + 1) + "|"]
    for h in by_host(results):
        st = {r.check: r.status for r in h.results}
        lines.append(f"| {h.host} | " + " | ".join(st.get(c, "") for c in checks) + " |")
    findings = [r for r in results if r.status in (FAILED, ERROR, WAIVED)]
    if findings:
        lines += ["", "## Findings", ""]
        for r in findings:
            lines.append(f"### {r.host} / {r.check}: {r.status}")
            if r.drift:
                lines += ["", "| key | expected | actual |", "|---|---|---|"]
                lines += [f"| {d.key} | {d.expected} | {d.actual} |" for d in r.drift]
            lines += ["", "```", r.message, "```"]
            if r.waiver:
                w = r.waiver
                lines.append(
                    f"Waiver ({'expired' if w.get('expired') else 'valid'} "
                    f"{w.get('expires')}): {w.get('justification')}"
                )
            if r.status == FAILED:
                lines.append(f"Fix: {fix_for(r.check, inventory, r.host)}")
            lines.append("")
    for uw in unused or []:
        lines.append(f"- unused waiver {uw.where}: {uw.check}")
    plots = _plots(results)
    if plots:
        lines += ["", "## Latency", ""]
        for host, png in plots:
            name = f"{out_path.stem}-{host}.png"
            (out_path.parent / name).write_bytes(png)
            lines.append(f"![{host} latency CDF]({name})")
    return "\n".join(lines) + "\n"


def html_report(
    results: list[CheckResult],
    inventory: str | Path,
    unused: list[Waiver] | None = None,
    wall: float | None = None,
) -> str:
    """A self-contained HTML report (plots embedded), from data/reports/check-report.html.j2."""
    code = exit_code(results)
    path = report_template("check-report.html.j2")
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(path.parent)),
        autoescape=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )
    findings = [
        {**r.to_dict(), "fix": fix_for(r.check, inventory, r.host) if r.status == FAILED else None}
        for r in results
        if r.status in (FAILED, ERROR, WAIVED)
    ]
    return env.get_template(path.name).render(
        verdict=verdict(code),
        inventory=str(inventory),
        code=code,
        wall=wall,
        checks=list(dict.fromkeys(r.check for r in results)),
        hosts=[
            {
                "host": h.host,
                "host_class": h.host_class,
                "statuses": {r.check: r.status for r in h.results},
            }
            for h in by_host(results)
        ],
        colors={PASSED: "#2e7d32", FAILED: "#c62828", ERROR: "#6a1b9a", WAIVED: "#ef6c00"},
        findings=findings,
        unused=unused or [],
        plots=[(host, base64.b64encode(png).decode()) for host, png in _plots(results)],
    )


def write_outputs(
    results: list[CheckResult],
    inventory: str | Path,
    *,
    json_path: Path | None = None,
    report: Path | None = None,
    unused: list[Waiver] | None = None,
    wall: float | None = None,
) -> None:
    for p in (json_path, report):
        if p is not None:
            p.parent.mkdir(parents=True, exist_ok=True)
    if json_path:
        json_path.write_text(json.dumps(to_json(results, inventory, unused, wall), indent=2))
    if report:
        if report.suffix.lower() in (".html", ".htm"):
            report.write_text(html_report(results, inventory, unused, wall))
        else:
            report.write_text(markdown(results, inventory, report, unused, wall))
