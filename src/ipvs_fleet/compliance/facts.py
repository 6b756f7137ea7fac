"""Everything the checks read from one host, gathered in a single remote command.

Under QEMU TCG each remote command costs a process start and a channel; the checks need
about ten facts per host, so they run as sections of one shell script and are parsed here.
The IPVS facts are the deploy's own pyinfra facts (`ipvs_fleet.deploy.facts`), so the deploy
and the checks read a host the same way; this module adds what only the checks need: the
persisted files, the sysctl table in a fresh network namespace, taint, kube-proxy and
keepalived (`compliance.keepalived`).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from ipvs_fleet.compliance import keepalived
from ipvs_fleet.deploy.facts import IpvsLoadedModules, IpvsSysctls, IpvsUsage
from ipvs_fleet.paths import MODULES_LOAD_FILE, SYSCTL_DIR, SYSCTL_FILE

MODULES_FILE = MODULES_LOAD_FILE
# systemd-sysctl's search path, highest precedence first (same basename: first dir wins).
SYSCTL_DIRS = (SYSCTL_DIR, "/run/sysctl.d", "/usr/local/lib/sysctl.d", "/usr/lib/sysctl.d")
MARK = "@@@ "
TAINT_OOT = 1 << 12  # O: out-of-tree module loaded
TAINT_UNSIGNED = 1 << 13  # E: unsigned module loaded
TAINT_LETTERS = "PFSRMBUDAWCIOELKXTN"  # bit i -> letter, as /proc/sys/kernel/tainted


def _persisted_cmd() -> str:
    globs = " ".join(f"{d}/*.conf" for d in SYSCTL_DIRS)
    return (
        f'for f in {globs} /etc/sysctl.conf; do [ -f "$f" ] && '
        "grep -H -E '^[[:space:]]*-?net[./]ipv4[./]vs[./]' \"$f\"; done; "
        f"echo '## modules-load'; if [ -f {MODULES_FILE} ]; then cat {MODULES_FILE}; "
        "else echo '#absent'; fi; true"
    )


def _netns_cmd(toggle: Iterable[str]) -> str:
    """Read every IPVS sysctl in a fresh netns; flip each 0/1 key in `toggle` and report
    any other key that changed with it (a dislocated sysctl table, as in the seed patch)."""
    keys = " ".join(shlex.quote(k) for k in toggle)
    script = (
        "cd /proc/sys/net/ipv4/vs 2>/dev/null || { echo '#no-ipvs'; exit 0; }; "
        'declare -A d; for f in *; do [ -r "$f" ] || continue; read -r v < "$f"; '
        'd[$f]="$v"; echo "default $f=$v"; done; '
        f'for k in {keys}; do [ -w "$k" ] || continue; o=${{d[$k]}}; '
        'case "$o" in 0) n=1;; 1) n=0;; *) continue;; esac; '
        'if ! echo $n > "$k" 2>/dev/null; then echo "write-failed $k"; continue; fi; '
        'read -r b < "$k"; [ "$b" = "$n" ] || echo "readback $k $n $b"; '
        'for f in "${!d[@]}"; do [ "$f" = "$k" ] && continue; read -r v < "$f"; '
        '[ "$v" = "${d[$f]}" ] || echo "alias $k $f"; done; echo $o > "$k"; done; echo "#done"'
    )
    return f"unshare -n bash -c {shlex.quote(script)}"


def _no_autoload(cmd: str) -> str:
    """`ipvsadm` loads ip_vs when it is not loaded: a check must not change the host."""
    return cmd.replace("ipvsadm -Ln", "{ [ -d /sys/module/ip_vs ] && ipvsadm -Ln; }")


def gather_command(toggle: Iterable[str]) -> str:
    """The one shell command whose output `parse` turns into HostFacts."""
    sections = {
        "kernel": "uname -r; cat /proc/sys/kernel/tainted",
        "loaded": IpvsLoadedModules().command(),
        "sysctls": IpvsSysctls().command(),
        "usage": _no_autoload(IpvsUsage().command()),
        "persisted": _persisted_cmd(),
        "netns": _netns_cmd(toggle),
        "kube_proxy": "pgrep -x kube-proxy >/dev/null && echo running || echo absent",
        "keepalived": keepalived.COMMAND,
    }
    return "; ".join(f"echo '{MARK}{n}'; ( {c} ) 2>/dev/null" for n, c in sections.items())


@dataclass
class NetnsTable:
    """The IPVS sysctl table as a fresh network namespace sees it."""

    ipvs: bool
    defaults: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # aliasing / readback / write failures
    complete: bool = False


@dataclass
class HostFacts:
    kernel_release: str
    tainted: int
    loaded: dict[str, dict[str, Any]]
    sysctls: dict[str, Any]
    usage: dict[str, Any]
    # key -> (value, file) of the last assignment systemd-sysctl would apply at boot
    persisted: dict[str, tuple[str, str]]
    fleet_file: dict[str, str]  # key -> value in SYSCTL_FILE (empty if absent)
    fleet_file_present: bool
    modules_load: list[str] | None  # None: MODULES_FILE absent
    netns: NetnsTable
    kube_proxy: bool
    # None: keepalived is not configured on the host (its checks do not apply)
    keepalived: keepalived.KeepalivedFacts | None = None

    def taint_flags(self, mask: int | None = None) -> str:
        v = self.tainted if mask is None else mask
        return "".join(c for i, c in enumerate(TAINT_LETTERS) if v & (1 << i))


def _sections(output: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    cur: list[str] | None = None
    for line in output.splitlines():
        if line.startswith(MARK):
            cur = out.setdefault(line[len(MARK) :].strip(), [])
        elif cur is not None:
            cur.append(line)
    return out


def _sysctl_key(raw: str) -> str:
    return raw.strip().lstrip("-").replace("/", ".").removeprefix("net.ipv4.vs.")


def parse_persisted(lines: list[str]) -> tuple[dict[str, tuple[str, str]], dict[str, str], bool]:
    """(effective boot value per key, SYSCTL_FILE's own values, whether SYSCTL_FILE exists).

    Emulates systemd-sysctl: files ordered by basename, the first directory of SYSCTL_DIRS
    shadowing later ones with the same basename, /etc/sysctl.conf last; the last assignment wins.
    """
    by_file: dict[str, list[tuple[str, str]]] = {}
    for line in lines:
        path, sep, rest = line.partition(":")
        if not sep or "=" not in rest:
            continue
        key, _, value = rest.partition("=")
        by_file.setdefault(path, []).append((_sysctl_key(key), value.strip()))
    chosen: dict[str, str] = {}
    for path in by_file:
        p = PurePosixPath(path)
        if str(p) == "/etc/sysctl.conf":
            continue
        prev = chosen.get(p.name)
        rank = lambda q: SYSCTL_DIRS.index(str(PurePosixPath(q).parent))  # noqa: E731
        if prev is None or rank(path) < rank(prev):
            chosen[p.name] = path
    order = [chosen[n] for n in sorted(chosen)]
    if "/etc/sysctl.conf" in by_file:
        order.append("/etc/sysctl.conf")
    effective: dict[str, tuple[str, str]] = {}
    for path in order:
        for key, value in by_file[path]:
            effective[key] = (value, path)
    own = dict(by_file.get(SYSCTL_FILE, []))
    return effective, own, SYSCTL_FILE in by_file


def parse_netns(lines: list[str]) -> NetnsTable:
    if any(line.strip() == "#no-ipvs" for line in lines):
        return NetnsTable(ipvs=False, complete=True)
    t = NetnsTable(ipvs=True)
    for line in lines:
        if line.startswith("default "):
            key, _, value = line[len("default ") :].partition("=")
            t.defaults[key] = " ".join(value.split())
        elif line.startswith("alias "):
            _, k, f = line.split()
            t.problems.append(f"writing {k} also changed {f}")
        elif line.startswith("readback "):
            _, k, wrote, read = line.split(maxsplit=3)
            t.problems.append(f"{k}: wrote {wrote}, read back {read}")
        elif line.startswith("write-failed "):
            t.problems.append(f"{line.split()[1]}: write refused")
        elif line.strip() == "#done":
            t.complete = True
    return t


def parse(output: str) -> HostFacts:
    """HostFacts from the output of `gather_command`."""
    s = _sections(output)
    kernel = [x.strip() for x in s.get("kernel", []) if x.strip()]
    if len(kernel) < 2 or not re.fullmatch(r"\d+", kernel[1]):
        raise ValueError(f"unexpected kernel section: {kernel!r}")
    persisted_lines = s.get("persisted", [])
    if "## modules-load" in persisted_lines:
        i = persisted_lines.index("## modules-load")
        sysctl_lines, ml = persisted_lines[:i], persisted_lines[i + 1 :]
    else:
        sysctl_lines, ml = persisted_lines, ["#absent"]
    effective, own, present = parse_persisted(sysctl_lines)
    modules_load = None
    if ml != ["#absent"]:
        modules_load = [x.split("#", 1)[0].strip() for x in ml if x.split("#", 1)[0].strip()]
    return HostFacts(
        kernel_release=kernel[0],
        tainted=int(kernel[1]),
        loaded=IpvsLoadedModules().process(s.get("loaded", [])),
        sysctls=IpvsSysctls().process(s.get("sysctls", [])),
        usage=IpvsUsage().process(s.get("usage", [])),
        persisted=effective,
        fleet_file=own,
        fleet_file_present=present,
        modules_load=modules_load,
        netns=parse_netns(s.get("netns", [])),
        kube_proxy=[x.strip() for x in s.get("kube_proxy", [])] == ["running"],
        keepalived=keepalived.parse_section(s.get("keepalived", [])),
    )
