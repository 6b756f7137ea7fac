"""Latency plots from probe / scenario JSON (matplotlib, controller only).

>>> plot_files([Path("stock.json"), Path("knob1.json")], Path("A.png"), scenario="A")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ipvs_fleet.errors import FleetError

SLOW_MS = 900.0


def series(result: dict[str, Any], scenario: str | None) -> list[tuple[str, list[float]]]:
    """(label, total ms of each successful attempt) for the scenarios of one result.

    Accepts a plain probe result (`attempts`) or a scenario run (`scenarios`, `ordinary`).
    """
    base = _label(result)
    out: list[tuple[str, list[float]]] = []
    if "attempts" in result or "samples_ms" in result:
        out.append((base or result.get("target", "probe"), _times(result)))
    items = dict(result.get("scenarios", {}))
    if "ordinary" in result:
        items["ordinary"] = result["ordinary"]
    for name, r in items.items():
        if scenario in (None, name):
            out.append((f"{base}: {name}" if base else name, _times(r)))
    return [(lbl, t) for lbl, t in out if t]


def _times(r: dict[str, Any]) -> list[float]:
    if "samples_ms" in r:
        return [float(x) for x in r["samples_ms"]]
    return [float(a["total_ms"]) for a in r.get("attempts", []) if a.get("error") is None]


def _label(result: dict[str, Any]) -> str:
    m = result.get("modules")
    if not isinstance(m, dict):
        return ""
    line = ".".join(str(m.get("kernel_release", "")).split(".")[:2])
    mods = (
        "stock"
        if not m.get("knob_present")
        else (f"knob={result.get('sysctls', {}).get('conn_reuse_old_conntrack')}")
    )
    rule = result.get("plan", {}).get("rule", "")
    return f"{line} {mods} INVALID-{rule}"


def pyplot() -> Any | None:
    """matplotlib's pyplot, headless; None without the `plots` extra (ipvs-fleet[plots])."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_files(
    paths: list[Path], out: Path, scenario: str | None = None, title: str | None = None
) -> int:
    """One CDF figure (log time axis, 900 ms marked) of every series in `paths`; # of curves."""
    plt = pyplot()
    if plt is None:
        raise FleetError("plots need matplotlib: pip install 'ipvs-fleet[plots]'")

    curves: list[tuple[str, list[float]]] = []
    for p in paths:
        try:
            data = json.loads(Path(p).read_text())
        except (OSError, ValueError) as e:
            raise FleetError(f"{p}: not a readable probe result: {e}") from e
        curves += series(data, scenario)
    if not curves:
        raise FleetError(
            f"no latencies to plot in {', '.join(map(str, paths))}"
            + (f" for scenario {scenario}" if scenario else "")
        )
    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=110)
    for label, times in curves:
        xs = sorted(times)
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        ax.step(xs, ys, where="post", label=f"{label} (n={len(xs)})")
    ax.axvline(SLOW_MS, color="red", linestyle="--", linewidth=1)
    ax.text(
        SLOW_MS * 0.93,
        0.5,
        "900 ms: slow (SYN retransmit)",
        color="red",
        fontsize=8,
        rotation=90,
        ha="right",
        va="center",
    )
    ax.set_xscale("log")
    longest = max(max(t) for _, t in curves)
    ax.set_xlim(
        left=max(0.1, min(min(t) for _, t in curves) * 0.7), right=max(2000.0, longest * 1.5)
    )
    ax.set_xlabel("connect + request + response (ms, log scale)")
    ax.set_ylabel("fraction of connections")
    ax.set_ylim(0, 1.02)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title or ("latency CDF" + (f", scenario {scenario}" if scenario else "")))
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return len(curves)
