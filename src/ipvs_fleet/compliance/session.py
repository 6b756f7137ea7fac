"""A check session: the selected hosts, their settings, and their facts fetched in parallel.

Each host gets one SSH connection, opened once and reused by all its checks. Facts for all
hosts are gathered concurrently as soon as the session starts, so the wall time of a run is
about that of the slowest host rather than the sum of all hosts. Every remote command is
bounded by the session's `command_timeout`: a hung host ends as "could not check".
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import testinfra.host

from ipvs_fleet.compliance import facts as facts_mod
from ipvs_fleet.compliance.inventory import FleetHost, load_inventory, select_hosts
from ipvs_fleet.compliance.remote import COMMAND_TIMEOUT, HostUnreachable, close_client, connect
from ipvs_fleet.errors import ConfigError
from ipvs_fleet.policy import HostSettings, Policy, load_policy

Prober = Callable[[testinfra.host.Host, HostSettings, facts_mod.HostFacts], dict[str, Any]]


@dataclass
class Target:
    """One host to check."""

    host: FleetHost
    settings: HostSettings


@dataclass
class CheckSession:
    inventory: Path
    targets: list[Target]
    policy: Policy
    command_timeout: float = COMMAND_TIMEOUT
    _pool: ThreadPoolExecutor | None = None
    _conns: dict[str, Future[testinfra.host.Host]] = field(default_factory=dict)
    _facts: dict[str, Future[facts_mod.HostFacts]] = field(default_factory=dict)
    _extra: dict[tuple[str, str], Future[Any]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def names(self) -> list[str]:
        return [t.host.name for t in self.targets]

    def target(self, name: str) -> Target:
        return next(t for t in self.targets if t.host.name == name)

    def start(self) -> None:
        """Connect to every host and gather its facts, all hosts at once."""
        if self._pool is not None:
            return
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(self.targets)) * 2)
        toggle = sorted(k for k, r in self.policy.schema.items() if (r["min"], r["max"]) == (0, 1))
        cmd = facts_mod.gather_command(toggle)
        for t in self.targets:
            conn = self._pool.submit(connect, t.host, self.command_timeout)
            self._conns[t.host.name] = conn
            self._facts[t.host.name] = self._pool.submit(_gather, conn, cmd)

    def connection(self, name: str) -> testinfra.host.Host:
        self.start()
        return self._conns[name].result()

    def facts(self, name: str) -> facts_mod.HostFacts:
        self.start()
        return self._facts[name].result()

    def after_facts(self, name: str, key: str, fn: Callable[[], Any]) -> Future[Any]:
        """Run `fn` once per (host, key), in the pool, after that host's facts are in.

        The caller waits on the future; later callers get the same future.
        """
        self.start()
        assert self._pool is not None
        with self._lock:
            if (name, key) not in self._extra:
                dep = self._facts[name]

                def run() -> Any:
                    dep.result()  # never measure while the facts script loads the host
                    return fn()

                self._extra[(name, key)] = self._pool.submit(run)
            return self._extra[(name, key)]

    def close(self) -> None:
        if self._pool is None:
            return
        self._pool.shutdown(wait=True, cancel_futures=True)
        for f in self._conns.values():
            if f.done() and f.exception() is None:
                client = f.result().backend.__dict__.get("client")
                if client is not None:
                    close_client(client)


def _gather(conn: Future[testinfra.host.Host], cmd: str) -> facts_mod.HostFacts:
    host = conn.result()
    try:
        out = host.run(cmd)
    except HostUnreachable:
        raise
    except Exception as e:  # paramiko raises a variety of errors on a dropped link
        raise HostUnreachable(f"lost connection while reading facts: {e}") from e
    try:
        return facts_mod.parse(out.stdout)
    except ValueError as e:
        raise HostUnreachable(f"cannot read facts (rc {out.rc}): {e}: {out.stderr[-500:]}") from e


def open_session(
    inventory: str | Path,
    limit: str | list[str] | None = None,
    policy: str | Path | None = None,
    command_timeout: float = COMMAND_TIMEOUT,
) -> CheckSession:
    """Load inventory and policy, select hosts, resolve each host's settings; each remote
    command of the session is bounded by `command_timeout` seconds.

    ConfigError for a missing/bad inventory, a limit matching nothing, or bad host data.
    """
    hosts = select_hosts(load_inventory(inventory), limit)
    pol = load_policy(policy)
    targets = []
    for h in hosts:
        if h.host_class is None:
            raise ConfigError(f"{inventory}: host {h.name}: no ipvs_host_class in its data")
        targets.append(Target(h, pol.for_host(h.name, h.data)))
    return CheckSession(Path(inventory), targets, pol, command_timeout)
