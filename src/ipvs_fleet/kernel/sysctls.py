"""The IPVS sysctl table's documented defaults per kernel line, and the integrity check.

A port that assigns `tbl[idx++].data` without the matching `vs_vars[]` entry (the seed's
bug) shifts every later key onto its neighbour's field; in a fresh network namespace that
shows as keys that read another key's default, or a missing/extra key.

>>> problems = integrity_problems("6.1", parse_dump(run(READ_ALL_IN_FRESH_NETNS)))
"""

from __future__ import annotations

from functools import cache
from typing import Any

import yaml

from ipvs_fleet.errors import ConfigError
from ipvs_fleet.kernel import SYSCTL_DEFAULTS

# Shell: every IPVS sysctl as `key=value` lines, read in a new, empty network namespace.
READ_ALL_IN_FRESH_NETNS = (
    "unshare --net sh -c 'cd /proc/sys/net/ipv4/vs && "
    'for f in *; do printf "%s=%s\\n" "$f" "$(tr -s "[:space:]" " " < "$f")"; done\''
)


@cache
def _data() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(SYSCTL_DEFAULTS.read_text())
    return data


def defaults(line: str, patched: bool = True) -> dict[str, int | list[int] | None]:
    """Key -> default of every IPVS sysctl of a kernel line (None: varies by host)."""
    lines = _data()["lines"]
    if line not in lines:
        raise ConfigError(f"{SYSCTL_DEFAULTS}: no sysctl defaults for kernel line {line}")
    out = dict(lines[line])
    if not patched:
        for k in _data()["patched"]:
            out.pop(k, None)
    return out


def patched_keys() -> set[str]:
    """Keys that only the patched module set has."""
    return {str(k) for k in _data()["patched"]}


def parse_dump(text: str) -> dict[str, str]:
    """`key=value` lines (READ_ALL_IN_FRESH_NETNS output) -> {key: value}."""
    out = {}
    for ln in text.splitlines():
        if "=" in ln:
            k, _, v = ln.partition("=")
            out[k.strip()] = v.strip()
    return out


def integrity_problems(line: str, read: dict[str, str], patched: bool = True) -> list[str]:
    """What is wrong with a fresh netns's IPVS sysctls (empty list: the table is intact)."""
    want = defaults(line, patched)
    problems = [f"{k}: missing" for k in want if k not in read]
    problems += [f"{k}: unexpected key (= {read[k]})" for k in read if k not in want]
    for k, v in want.items():
        if k not in read:
            continue
        got = read[k].split()
        if v is None:
            if not got:
                problems.append(f"{k}: empty")
            continue
        expect = [str(x) for x in (v if isinstance(v, list) else [v])]
        if got != expect:
            problems.append(f"{k}: reads {' '.join(got)}, default is {' '.join(expect)}")
    return problems
