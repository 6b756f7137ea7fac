"""A director's VRRP state, read from the host itself: which VRRP instances' VIPs it holds.

The VIPs are the `virtual_ipaddress` blocks of each `vrrp_instance` of the host's own
/etc/keepalived/keepalived.conf (not inventory data, which could drift from what keepalived
runs, its `include`s expanded on the host); the held addresses are `ip -o addr show`'s. A
host holding all VIPs of an instance is its master. This is a deliberately tiny reader
(blocks and first words only; no `@` conditionals): the full parser is
ipvs_fleet.keepalived.config's. The includes are expanded by the host in the one command
(the Ansible role gets one command's output, the rollout one round trip per member); the
checks, which name files and lines, read them file by file (compliance.keepalived).

    >>> vrrp_state(run(ROLE_COMMAND)).master
    True
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

CONF = "/etc/keepalived/keepalived.conf"
ROLE_MARK = "@@ipvs-fleet-addrs@@"
MAX_INCLUDE_DEPTH = 8


def role_command(conf: str = CONF) -> str:
    """keepalived.conf with its `include`s expanded in place (glob, relative to the including
    file's directory, as keepalived; readable by root: run as the deploy runs), a mark, the
    host's addresses. POSIX sh, no process per line."""
    return f"""ipvs_fleet_conf() (
  file=$1 depth=$2 dir=${{1%/*}}
  while IFS= read -r line || [ -n "$line" ]; do
    set -f; set -- ${{line%%[#!]*}}; set +f
    if [ "${{1-}}" = include ] && [ -n "${{2-}}" ]; then
      [ "$depth" -lt {MAX_INCLUDE_DEPTH} ] || {{
        echo "$file: include nested deeper than {MAX_INCLUDE_DEPTH}" >&2; exit 3; }}
      case $2 in /*) pat=$2 ;; *) pat=$dir/$2 ;; esac
      for f in $pat; do
        [ ! -f "$f" ] || ipvs_fleet_conf "$f" $((depth + 1)) || exit $?
      done
    else
      printf '%s\\n' "$line"
    fi
  done < "$file"
)
ipvs_fleet_conf {shlex.quote(conf)} 0 && echo {ROLE_MARK} && ip -o addr show"""


ROLE_COMMAND = role_command()
ALL, NONE, PART = "all", "none", "part"
_COMMENT = re.compile(r"[#!].*$")
_INET = re.compile(r"\binet6?\s+(\S+)")


@dataclass(frozen=True)
class VrrpState:
    """Per VRRP instance, how much of its VIPs the host holds (all | none | part); `error`
    when the host could not be read."""

    held: Mapping[str, str] = field(default_factory=dict)
    error: str = ""

    @property
    def master(self) -> bool:
        return not self.error and ALL in self.held.values()

    @property
    def role(self) -> str:
        if self.error:
            return "unknown"
        return "master" if self.master else ("backup" if PART not in self.held.values() else "part")


def _address(word: str) -> str | None:
    try:
        return str(ipaddress.ip_interface(word).ip)
    except ValueError:
        return None


def parse_vips(conf: str) -> dict[str, tuple[str, ...]]:
    """{instance: its virtual_ipaddress addresses} of a keepalived.conf text."""
    out: dict[str, tuple[str, ...]] = {}
    stack: list[str] = []  # the words that opened each enclosing block
    for raw in conf.splitlines():
        line = _COMMENT.sub("", raw).strip()
        if not line:
            continue
        words = line.replace("{", " { ").replace("}", " } ").split()
        if (
            stack[-2:-1]
            and stack[-1] == "virtual_ipaddress"
            and stack[-2].startswith("vrrp_instance ")
        ):
            ip = _address(words[0]) if words[0] not in "{}" else None
            if ip:
                name = stack[-2].split()[1]
                out[name] = (*out.get(name, ()), ip)
        head: list[str] = []
        for w in words:
            if w == "{":
                stack.append(" ".join(head[:2]))
                head = []
            elif w == "}":
                if stack:
                    stack.pop()
                head = []
            else:
                head.append(w)
    return out


def vrrp_state(output: str) -> VrrpState:
    """The state from ROLE_COMMAND's output."""
    conf, mark, addrs = output.partition(ROLE_MARK)
    if not mark:
        return VrrpState({}, f"could not read {CONF} and the addresses: {output.strip()[:200]}")
    vips = parse_vips(conf)
    if not vips:
        return VrrpState({}, f"no virtual_ipaddress in a vrrp_instance of {CONF}")
    have = {a for w in _INET.findall(addrs) if (a := _address(w))}
    held = {}
    for name, ips in vips.items():
        n = sum(1 for ip in ips if ip in have)
        held[name] = ALL if n == len(ips) else (NONE if n == 0 else PART)
    return VrrpState(held)


READ_TIMEOUT_S = 60


def state_reader(connect: Callable[[str], Any]) -> Callable[[Sequence[str]], dict[str, VrrpState]]:
    """Read hosts' VRRP states over `connect(name) -> Shell` (rollout.held's ssh_connector:
    as the deploy reaches them); a host that cannot be read gets an `error`."""

    def read(hosts: Sequence[str]) -> dict[str, VrrpState]:
        out: dict[str, VrrpState] = {}
        for h in hosts:
            shell = None
            try:
                shell = connect(h)
                rc, stdout, stderr = shell.run(ROLE_COMMAND, READ_TIMEOUT_S)
                out[h] = (
                    vrrp_state(stdout)
                    if rc == 0
                    else VrrpState({}, f"reading {CONF} failed (exit {rc}): {stderr.strip()[:200]}")
                )
            except Exception as e:  # unreachable, auth, timeout: the wave is refused, saying so
                out[h] = VrrpState({}, f"unreachable: {type(e).__name__}: {e}")
            finally:
                if shell is not None:
                    with suppress(Exception):
                        shell.close()
        return out

    return read
