"""The held-connections gate: connections held open through a private IPVS service on each
host of a wave while it is deployed; a host where any broke fails its gate.

Before a wave's deploy, `HeldConnections.during` runs the guest side of
`ipvs_fleet.probe.inflight` on each host of the wave (slot 1: names, addresses and state of
its own, beside the demo's or a lab test's run): an IPVS NAT service on a VIP of a dummy
device, a real server and a client in network namespaces of their own, and N TCP connections
through it, each exchanging a line every 0.5 s. Whatever ends the deploy (done, failed,
Ctrl-C) it then stops them, tears the topology down and keeps each host's verdict, which
`judge` adds to that host's gate outcome: any broken connection, or held connections that
could not be set up or read, fail the host.

Hosts are reached as the checks reach them (`compliance.remote.connect`: the inventory's
ssh_* data and ssh_config, host keys checked strictly, sudo with `_sudo` host data or the
rollout's --sudo). The guest script is written by root into a root-only folder and its sha256
is checked before every run, so root runs the controller's script or nothing.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shlex
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from importlib.resources import files
from typing import Any, Protocol

from ipvs_fleet.paths import HELD_DIR
from ipvs_fleet.rollout.runner import Outcome, Progress, StepResult

SLOT = 1  # inflight's INFLIGHT_SLOT for the gate's runs
REMOTE_DIR = HELD_DIR  # tmpfs, root only: gone with a reboot, as the run is
REMOTE = f"{REMOTE_DIR}/inflight.py"
BOOT_ID = "/proc/sys/kernel/random/boot_id"
INSTALL_TIMEOUT, DOWN_TIMEOUT = 60.0, 120.0
WHAT = "connections held through a private IPVS service"


def up_timeout(count: int) -> float:
    """The guest's `up` waits 30 s + 0.1 s per connection for its client, after the topology."""
    return 120.0 + 0.1 * count


class Shell(Protocol):
    """Commands on one host: (exit code, stdout, stderr); raises OSError (or paramiko's
    errors) when the host cannot be reached or stays silent past `timeout`."""

    def run(self, cmd: str, timeout: float) -> tuple[int, str, str]: ...

    def close(self) -> None: ...


Connect = Callable[[str], Shell]  # host name -> its shell


def guest_script() -> bytes:
    return (files("ipvs_fleet.probe") / "inflight.py").read_bytes()


def install_command(script: bytes) -> str:
    """Write the guest script as root into the root-only REMOTE_DIR."""
    b64 = base64.b64encode(script).decode()
    return (
        '[ "$(id -u)" = 0 ] || { echo "needs root: connect as root, or use sudo (_sudo host '
        'data or ipvs-fleet rollout --sudo)" >&2; exit 1; }; '
        f"umask 077 && mkdir -p {REMOTE_DIR} && printf %s {b64} | base64 -d > {REMOTE}.new && "
        f"mv -f {REMOTE}.new {REMOTE}"
    )


def guest_command(sha256: str, *args: str) -> str:
    """Run the guest script with `args` if it is still the controller's (sha256)."""
    return (
        f"echo '{sha256}  {REMOTE}' | sha256sum -c --status || {{ echo '{REMOTE}: not the "
        "script the controller sent (sha256 differs)' >&2; exit 3; }; "
        f"INFLIGHT_SLOT={SLOT} python3 {REMOTE} {shlex.join(args)}"
    )


def _last_json(out: str) -> dict[str, Any]:
    lines = out.strip().splitlines()
    doc = json.loads(lines[-1]) if lines else None
    if not isinstance(doc, dict):
        raise ValueError(f"no JSON result in {out.strip()[-300:]!r}")
    return doc


def _why(rc: int, err: str, out: str = "") -> str:
    text = " ".join((err.strip() or out.strip()).split())
    return (text[-400:] or "no output") + f" (exit {rc})"


@dataclass
class HeldHost:
    """One host's held connections, from set-up to result."""

    name: str
    shell: Shell | None = None
    boot_id: str = ""
    started: bool = False  # the guest's `up` ran (its topology may exist)
    error: str = ""  # why they could not be set up
    result: dict[str, Any] | None = None  # the guest's `down`
    lost: str = ""  # why no result could be read


def verdict(h: HeldHost, count: int) -> Outcome:
    """The gate's verdict on one host's held connections; `details["held"]` has the counts."""
    if h.error:
        return Outcome(False, f"{count} {WHAT} could not be set up: {h.error}")
    if h.lost:
        return Outcome(False, f"the result of the {count} {WHAT} could not be read: {h.lost}")
    r = h.result or {}
    if "error" in r or "broken" not in r:
        return Outcome(False, f"the {count} {WHAT}: {r.get('error') or f'no result: {r}'}")
    n, broken = int(r.get("connections", count)), int(r["broken"])
    held = {k: r.get(k) for k in ("connections", "broken", "exchanges", "seconds")}
    if broken:
        first = (r.get("failures") or [{}])[0]
        held["first"] = first
        why = f"first at {first.get('at', '?')} s: {first.get('error', '?')}"
        return Outcome(
            False, f"{broken} of {n} {WHAT} broke during the deploy ({why})", {"held": held}
        )
    note = f"{n} {WHAT} for {r.get('seconds')} s of the deploy: none broke"
    return Outcome(True, note, {"held": held})


@dataclass
class HeldConnections:
    """`count` connections held on each host of a wave through its deploy (0: off)."""

    count: int
    connect: Connect
    script: bytes = field(default_factory=guest_script)
    verdicts: dict[str, Outcome] = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.script).hexdigest()

    @contextmanager
    def during(self, hosts: Sequence[str], progress: Progress) -> Iterator[None]:
        """Hold the connections on `hosts` for the block; stopped and torn down however it
        ends, each host's verdict in `verdicts` afterwards."""
        if self.count <= 0 or not hosts:
            yield
            return
        self.verdicts = {}
        runs = [HeldHost(h) for h in hosts]
        progress(
            "",
            f"hold {self.count} connections through a private IPVS service on {len(runs)} host(s)",
        )
        pool = ThreadPoolExecutor(max_workers=min(len(runs), 16))
        try:
            futures = [pool.submit(self._up, h) for h in runs]
            for f in futures:
                f.result()
            yield
        finally:
            # ups still running end first (bounded by their timeouts); an interrupted one
            # may have left a topology: every host whose `up` ran is torn down.
            pool.shutdown(wait=True, cancel_futures=True)
            with ThreadPoolExecutor(max_workers=min(len(runs), 16)) as down:
                list(down.map(self._down, runs))
            self.verdicts = {h.name: verdict(h, self.count) for h in runs}
            bad = sum(1 for v in self.verdicts.values() if not v.ok)
            progress(
                "",
                f"held connections: {len(runs) - bad} host(s) with none broken"
                + (f", {bad} FAILED" if bad else ""),
            )

    def _up(self, h: HeldHost) -> None:
        try:
            h.shell = self.connect(h.name)
            rc, out, err = h.shell.run(install_command(self.script), INSTALL_TIMEOUT)
            if rc != 0:
                h.error = f"cannot install {REMOTE}: {_why(rc, err)}"
                return
            h.started = True
            up = f"cat {BOOT_ID} && " + guest_command(self.sha256, "up", str(self.count))
            rc, out, err = h.shell.run(up, up_timeout(self.count))
            if rc != 0:
                h.error = _why(rc, err, out)
                return
            h.boot_id = out.split("\n", 1)[0].strip()
            status = _last_json(out)
            if int(status.get("connections", 0)) != self.count:
                h.error = f"the client holds {status.get('connections')} connections"
        except Exception as e:  # paramiko and the network raise a variety of errors
            h.error = h.error or f"{type(e).__name__}: {e}"

    def _down(self, h: HeldHost) -> None:
        """Stop the client and tear the topology down; a host that rebooted meanwhile lost
        both. One new connection if the first one is gone."""
        if not h.started or h.shell is None:
            self._close(h)
            return
        down = guest_command(self.sha256, "down")
        # no boot id: the `up` failed half-way, and its topology goes whatever the boot
        cmd = (
            f'b=$(cat {BOOT_ID}); echo "$b"; [ "$b" != {shlex.quote(h.boot_id)} ] || {down}'
            if h.boot_id
            else f"cat {BOOT_ID}; {down}"
        )
        try:
            for attempt in (1, 2):
                try:
                    rc, out, err = h.shell.run(cmd, DOWN_TIMEOUT)
                    break
                except Exception:
                    if attempt == 2:
                        raise
                    self._close(h)
                    h.shell = self.connect(h.name)
            if rc != 0:
                h.lost = _why(rc, err, out)
            elif h.boot_id and out.split("\n", 1)[0].strip() != h.boot_id:
                h.lost = "the host rebooted during the deploy, and the connections with it"
            else:
                h.result = _last_json(out)
        except Exception as e:
            h.lost = f"{type(e).__name__}: {e}"
        finally:
            self._close(h)

    @staticmethod
    def _close(h: HeldHost) -> None:
        if h.shell is not None:
            with suppress(Exception):  # closing a dead link: nothing left to release
                h.shell.close()
            h.shell = None

    def judge(self, res: StepResult) -> StepResult:
        """The gate's outcomes with each host's held-connections verdict: a failed one fails
        the host (its reason first); a good one is the host's note."""
        for name, o in res.hosts.items():
            v = self.verdicts.pop(name, None)
            if v is None:
                continue
            o.details.update(v.details)
            if not v.ok:
                o.reason = v.reason + (f"; {o.reason}" if not o.ok and o.reason else "")
                o.ok = False
            elif o.ok:
                o.details["note"] = v.reason
        return res


@dataclass
class SshShell:
    """A Shell over a paramiko client of `compliance.remote.connect` (sudo as it says)."""

    client: Any
    sudo: bool = False
    sudo_user: str | None = None

    def run(self, cmd: str, timeout: float) -> tuple[int, str, str]:
        if self.sudo:
            user = f"-u {shlex.quote(self.sudo_user)} " if self.sudo_user else ""
            cmd = f"sudo -n {user}sh -c {shlex.quote(cmd)}"
        stdin, out, err = self.client.exec_command(cmd, timeout=timeout)
        stdin.close()
        o, e = out.read(), err.read()
        rc = out.channel.recv_exit_status()
        return rc, o.decode(errors="replace"), e.decode(errors="replace")

    def close(self) -> None:
        self.client.close()
        for hop in self.client.__dict__.get("ipvs_fleet_hops", []):
            hop.close()


def ssh_connector(
    hosts: Iterable[tuple[str, Sequence[str], dict[str, Any]]], sudo: bool = False
) -> Connect:
    """Connect to an inventory host (name, groups, data) as the checks do; `sudo`: as with
    `_sudo` host data."""
    from ipvs_fleet.compliance.inventory import FleetHost
    from ipvs_fleet.compliance.remote import connect as ssh

    known = {name: (tuple(groups), data) for name, groups, data in hosts}

    def connect(name: str) -> Shell:
        groups, data = known[name]
        if sudo:
            data = {**data, "_sudo": True}
        host = ssh(FleetHost(name, groups, data))
        client = host.backend.__dict__["client"]
        client.get_transport().set_keepalive(15)  # a deploy may keep it idle for minutes
        return SshShell(client, bool(data.get("_sudo")), data.get("_sudo_user") or None)

    return connect
