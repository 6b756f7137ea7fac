"""What the keepalived checks read from a director, in the facts script's `keepalived` section.

The checks apply where keepalived is configured: its configuration file (the running
keepalived's `-f`/`--use-file`, else /etc/keepalived/keepalived.conf) exists. Elsewhere the
section says `absent` and the checks pass with `keepalived: not configured` in their details,
as `reuse_safety` passes where the knob is off. Files the configuration includes are read
afterwards over the same connection (`remote_reader`).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Any

from ipvs_fleet.keepalived import config as ka_config
from ipvs_fleet.keepalived import live

DEFAULT_CONF = "/etc/keepalived/keepalived.conf"
SUB = "@@ka "  # sub-section marker inside the facts section
NOT_CONFIGURED = f"not configured (no {DEFAULT_CONF})"

# One shell snippet (sh): the running keepalived and its config file, `--config-test` of that
# file, the IPVS table and sync daemons (ipvsadm only where ip_vs is loaded: it would load it),
# the addresses and keepalived's VRRP states since its last start (its journal).
COMMAND = rf"""
conf={DEFAULT_CONF}; p=$(pgrep -o -x keepalived)
if [ -n "$p" ]; then
  set -- $(tr '\0' ' ' < /proc/$p/cmdline)
  while [ $# -gt 0 ]; do case "$1" in
    -f|--use-file) conf=$2; shift ;; --use-file=*) conf=${{1#*=}} ;; -f?*) conf=${{1#-f}} ;;
  esac; shift; done
fi
echo "{SUB}pid ${{p:-none}}"; echo "{SUB}conf $conf"
if [ ! -f "$conf" ]; then echo "{SUB}absent"; exit 0; fi
echo "{SUB}text"; cat "$conf"; echo
out=$(keepalived --config-test -f "$conf" 2>&1); rc=$?
echo "{SUB}config-test $rc"; printf '%s\n' "$out" | tail -n 30
if [ -d /sys/module/ip_vs ]; then
  echo "{SUB}table"; ipvsadm -Sn; echo "{SUB}daemon"; ipvsadm -Ln --daemon
else echo "{SUB}no-ipvs"; fi
echo "{SUB}addr"; ip -o addr
echo "{SUB}journal"
i=$(systemctl show -p InvocationID --value keepalived 2>/dev/null)
[ -n "$p" ] && [ -n "$i" ] && journalctl --no-pager -o cat _SYSTEMD_INVOCATION_ID="$i" |
  grep -i 'entering .* state'
true
"""


@dataclass
class KeepalivedFacts:
    """The raw keepalived section of one host's facts."""

    conf: str
    pid: int | None  # the running keepalived's main process, None when it is not running
    text: str = ""
    config_test_rc: int | None = None
    config_test_out: str = ""
    ipvs_loaded: bool = True
    table: str = ""
    daemon: str = ""
    addr: str = ""
    journal: str = ""


def parse_section(lines: list[str]) -> KeepalivedFacts | None:
    """KeepalivedFacts from the section's lines; None where keepalived is not configured."""
    parts: dict[str, list[str]] = {}
    heads: dict[str, str] = {}
    cur: list[str] | None = None
    for line in lines:
        if line.startswith(SUB):
            name, _, arg = line[len(SUB) :].strip().partition(" ")
            heads[name] = arg
            cur = parts.setdefault(name, [])
        elif cur is not None:
            cur.append(line)
    if "conf" not in heads or "absent" in heads:
        return None
    text = "\n".join(parts.get("text", []))
    rc = heads.get("config-test", "")
    pid = heads.get("pid", "none")
    return KeepalivedFacts(
        conf=heads["conf"],
        pid=int(pid) if pid.isdigit() else None,
        text=text,
        config_test_rc=int(rc) if rc.lstrip("-").isdigit() else None,
        config_test_out="\n".join(parts.get("config-test", [])).strip(),
        ipvs_loaded="no-ipvs" not in heads,
        table="\n".join(parts.get("table", [])),
        daemon="\n".join(parts.get("daemon", [])),
        addr="\n".join(parts.get("addr", [])),
        journal="\n".join(parts.get("journal", [])),
    )


def remote_reader(run: Any) -> ka_config.Reader:
    """A config Reader over `run(cmd) -> result with .stdout` (a testinfra Host's run): the
    host's shell expands the pattern (globbing only: it is never evaluated as code)."""

    def read(pattern: str) -> list[tuple[str, str]]:
        cmd = (
            f"IFS=$(printf '\\n'); p={shlex.quote(pattern)}; for f in $p; do "
            f'[ -f "$f" ] && {{ echo "{SUB}file $f"; cat "$f"; echo; }}; done; true'
        )
        out = run(cmd).stdout
        files: list[tuple[str, str]] = []
        for line in out.splitlines():
            if line.startswith(f"{SUB}file "):
                files.append((line[len(SUB) + 5 :], ""))
            elif files:
                path, text = files[-1]
                files[-1] = (path, text + line + "\n")
        return files

    return read


@dataclass
class Director:
    """A keepalived director: its configuration and what it runs, read once per host."""

    facts: KeepalivedFacts
    config: ka_config.KeepalivedConfig
    table: dict[live.ServiceKey, live.LiveService] = field(default_factory=dict)
    table_error: str | None = None
    daemons: list[live.LiveSyncDaemon] = field(default_factory=list)
    addresses: dict[ka_config.IPAddress, str] = field(default_factory=dict)
    own_states: dict[str, str] = field(default_factory=dict)

    @property
    def running(self) -> bool:
        return self.facts.pid is not None


def director(kf: KeepalivedFacts, reader: ka_config.Reader | None) -> Director:
    """The Director of a host's keepalived facts, includes read through `reader`."""
    cfg = ka_config.parse(kf.text, kf.conf, reader)
    d = Director(kf, cfg)
    try:
        d.table = live.parse_table(kf.table)
    except ValueError as e:
        d.table_error = str(e)
    d.daemons = live.parse_daemons(kf.daemon)
    d.addresses = live.parse_addresses(kf.addr)
    d.own_states = live.parse_vrrp_states(kf.journal)
    return d
