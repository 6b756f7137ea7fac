"""One SSH connection per host, host keys checked, wrapped as a testinfra Host.

The host's ssh_config (HostName, User, Port, IdentityFile, ProxyJump) is honoured as ssh and
pyinfra honour it; the inventory's ssh_* host data win over it. Every remote command is
bounded (`command_timeout`, `ipvs-fleet check --command-timeout`): a host that stops
answering is "could not check" instead of holding the whole run, and a dropped link is
opened again only the verified way.
"""

from __future__ import annotations

import argparse
import math
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko
import testinfra.backend.base
import testinfra.host
from testinfra.backend.paramiko import ParamikoBackend

from ipvs_fleet.compliance.inventory import FleetHost

CONNECT_TIMEOUT = 15
# Default bound of one remote command, the latency probe included (its own deadline is 40 s;
# the slowest facts read measured under TCG took a few seconds).
COMMAND_TIMEOUT = 120.0
# SSH keepalive interval: keeps NAT and firewall state of an idle link alive between checks.
KEEPALIVE = 15


class HostUnreachable(Exception):
    """The host could not be reached or authenticated: its checks cannot run."""


class CommandTimeout(HostUnreachable):
    """A remote command got no answer in time: the host (or the link) is hung."""


def positive_seconds(text: str) -> float:
    """argparse type of a timeout: a finite number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"a number of seconds above 0, not {text!r}")
    return value


def _expand(value: Any) -> str | None:
    return os.path.expanduser(str(value)) if value else None


@dataclass(frozen=True)
class SshTarget:
    """Where and as whom to connect: pyinfra ssh_* host data over the host's ssh_config."""

    hostname: str
    port: int
    user: str | None
    keys: tuple[str, ...]  # identity files; empty: the agent and ~/.ssh/id_* (as ssh)
    explicit_key: bool  # ssh_key host data: that key only, as pyinfra does
    jump: tuple[str, ...] = ()  # ProxyJump hops, [user@]host[:port], first hop first


def _load_config(path: str | None) -> paramiko.SSHConfig | None:
    p = Path(_expand(path) or Path.home() / ".ssh" / "config")
    if not p.is_file():
        if path:  # named in the inventory: missing is an error, not a silent default
            raise HostUnreachable(f"ssh_config_file {p} not found")
        return None
    try:
        return paramiko.SSHConfig.from_path(str(p))
    except (OSError, ValueError) as e:
        raise HostUnreachable(f"cannot read ssh config {p}: {e}") from e


def resolve(alias: str, data: dict[str, Any], config: paramiko.SSHConfig | None) -> SshTarget:
    """The connection of `alias` (ssh_hostname, else the inventory name).

    Host data wins over the ssh_config entry (HostName, User, Port, IdentityFile,
    ProxyJump), as in pyinfra's own connector; without either, ssh's defaults.
    """
    c = config.lookup(alias) if config is not None else {}
    key = _expand(data.get("ssh_key"))
    files = [_expand(f) for f in c.get("identityfile", [])]
    keys = (key,) if key else tuple(f for f in files if f and Path(f).is_file())
    jump = str(c.get("proxyjump") or "")
    return SshTarget(
        hostname=str(c.get("hostname") or alias),
        port=int(data.get("ssh_port") or c.get("port") or 22),
        user=str(data.get("ssh_user") or c.get("user") or "") or None,
        keys=keys,
        explicit_key=bool(key),
        jump=() if jump.lower() in ("", "none") else tuple(h.strip() for h in jump.split(",")),
    )


def _hop(spec: str, config: paramiko.SSHConfig | None) -> SshTarget:
    """A ProxyJump hop `[user@]host[:port]`, its ssh_config entry applied."""
    user, _, hostport = spec.rpartition("@")
    host, _, port = hostport.partition(":")
    data: dict[str, Any] = {"ssh_user": user or None, "ssh_port": port or None}
    return resolve(host, data, config)


def _open(
    t: SshTarget, known: str | None, password: str | None, sock: Any = None
) -> paramiko.SSHClient:
    """A connected client; host keys strictly from `known` (else the user's known_hosts)."""
    client = paramiko.SSHClient()
    try:
        if known:
            client.load_host_keys(known)
        else:
            client.load_system_host_keys()
    except OSError as e:
        raise HostUnreachable(f"cannot read known hosts file {known}: {e.strerror}") from e
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    if t.explicit_key and not Path(t.keys[0]).is_file():
        raise HostUnreachable(f"ssh_key {t.keys[0]} not found")
    where = f"{t.hostname}:{t.port}"
    try:
        client.connect(
            t.hostname,
            port=t.port,
            username=t.user,
            key_filename=list(t.keys) or None,  # type: ignore[arg-type]  # a list works
            password=password,
            timeout=CONNECT_TIMEOUT,
            banner_timeout=CONNECT_TIMEOUT,
            auth_timeout=CONNECT_TIMEOUT,
            allow_agent=not t.explicit_key,
            look_for_keys=not t.explicit_key,
            sock=sock,
        )
    except paramiko.BadHostKeyException as e:
        raise HostUnreachable(f"{where}: host key changed (not {known})") from e
    except paramiko.SSHException as e:
        raise HostUnreachable(f"{where}: {e}") from e
    except (TimeoutError, OSError) as e:
        raise HostUnreachable(f"{where}: {e.strerror or e}") from e
    transport = client.get_transport()
    assert transport is not None  # connected
    transport.set_keepalive(KEEPALIVE)
    return client


def open_client(fh: FleetHost) -> paramiko.SSHClient:
    """A paramiko client connected from pyinfra ssh_* host data and the host's ssh_config
    (`ssh_config_file` host data, else ~/.ssh/config), its ProxyJump hops attached
    (`ipvs_fleet_hops`), its sudo checked when the data ask for `_sudo`.

    Host keys are checked against `ssh_known_hosts_file` (else the user's known_hosts), for
    ProxyJump hops too; an unknown or changed key refuses the connection (StrictHostKeyChecking
    in an ssh_config does not loosen that). Raises HostUnreachable with the reason.
    """
    d = fh.data
    config = _load_config(d.get("ssh_config_file"))
    target = resolve(str(d.get("ssh_hostname") or fh.name), d, config)
    known = _expand(d.get("ssh_known_hosts_file"))
    sock = None
    hops: list[paramiko.SSHClient] = []
    for i, spec in enumerate(target.jump):
        hop = _hop(spec, config)
        hops.append(_open(hop, known, None, sock))
        nxt = _hop(target.jump[i + 1], config) if i + 1 < len(target.jump) else target
        transport = hops[-1].get_transport()
        assert transport is not None
        try:
            sock = transport.open_channel(
                "direct-tcpip",
                (nxt.hostname, nxt.port),
                ("127.0.0.1", 0),
                timeout=CONNECT_TIMEOUT,
            )
        except (paramiko.SSHException, OSError) as e:
            raise HostUnreachable(
                f"{hop.hostname}:{hop.port}: cannot reach {nxt.hostname}:{nxt.port}: {e}"
            ) from e
    client = _open(target, known, d.get("ssh_password") or None, sock)
    client.__dict__["ipvs_fleet_hops"] = hops  # the jump connections live as long as it
    if d.get("_sudo"):
        _check_sudo(client, fh.name, str(target.user or "the SSH user"))
    return client


def close_client(client: paramiko.SSHClient) -> None:
    """Close a client of open_client and its jump connections."""
    client.close()
    for hop in client.__dict__.get("ipvs_fleet_hops", []):
        hop.close()


def connect(fh: FleetHost, command_timeout: float = COMMAND_TIMEOUT) -> testinfra.host.Host:
    """A testinfra Host over one verified connection (open_client), each of its commands
    bounded by `command_timeout` seconds. Raises HostUnreachable with the reason."""
    client = open_client(fh)
    # With `_sudo` (pyinfra's host data) every command runs through sudo, as the deploy's do.
    backend = VerifiedBackend(
        fh.name,
        client,
        lambda: open_client(fh),
        command_timeout,
        sudo=bool(fh.data.get("_sudo")),
        sudo_user=fh.data.get("_sudo_user") or None,
    )
    return testinfra.host.Host(backend)


@contextmanager
def bounded(client: paramiko.SSHClient, seconds: float, why: str) -> Iterator[None]:
    """Run the block's SSH calls on `client` for at most `seconds`, else close its connection
    and raise CommandTimeout(`why`). Closing is what wakes the block: paramiko's own waits
    for a channel, a subsystem or an exit status have no timeout of their own."""
    transport = client.get_transport()
    fired = threading.Event()

    def expire() -> None:
        fired.set()
        if transport is not None:
            transport.close()

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    except Exception as e:
        if fired.is_set():
            raise CommandTimeout(why) from e
        raise
    finally:
        timer.cancel()
    if fired.is_set():
        raise CommandTimeout(why)


class VerifiedBackend(ParamikoBackend):
    """testinfra's paramiko backend on a client of open_client.

    testinfra's own would connect by itself with WarningPolicy and no known_hosts, and does
    so again when a command finds the link dead: here a dead link is opened again only by
    `reopen` (open_client: host keys checked, unknown ones rejected). Every command is bounded
    by `command_timeout`; after one timed out the host counts as hung: its later commands
    fail at once, without a new connection (a hung host would cost a connect timeout each).
    """

    def __init__(
        self,
        name: str,
        client: paramiko.SSHClient,
        reopen: Callable[[], paramiko.SSHClient],
        command_timeout: float,
        **kwargs: Any,
    ) -> None:
        super().__init__(f"paramiko://{name}", **kwargs)
        self.__dict__["client"] = client  # testinfra's `client` would connect on first use
        self.name = name
        self.reopen = reopen
        self.command_timeout = command_timeout
        self.hung: str | None = None

    @contextmanager
    def bounded(self, what: str) -> Iterator[None]:
        """A block of SSH calls on this host (`what`: a command, an SFTP copy) bounded by
        command_timeout; CommandTimeout marks the host hung."""
        if self.hung:
            raise CommandTimeout(self.hung)
        why = (
            f"{self.name}: no answer within {self.command_timeout:g} s (--command-timeout) to "
            f"{what}; the host or its link is hung: its remaining checks are not run"
        )
        try:
            with bounded(self.client, self.command_timeout, why):
                yield
        except CommandTimeout as e:
            self.hung = str(e)
            raise

    def _exec_command(self, command: bytes) -> tuple[int, bytes, bytes]:
        text = command.decode(errors="replace")
        with self.bounded(f"`{text[:60]}{'...' if len(text) > 60 else ''}`"):
            transport = self.client.get_transport()
            if transport is None or not transport.is_active():
                raise paramiko.SSHException("SSH session not active")
            return super()._exec_command(command)

    def run(self, command: str, *args: str, **kwargs: Any) -> testinfra.backend.base.CommandResult:
        cmd = self.encode(self.get_command(command, *args))
        try:
            rc, stdout, stderr = self._exec_command(cmd)
        except CommandTimeout:
            raise
        except (paramiko.SSHException, OSError, EOFError):
            transport = self.client.get_transport()
            if transport is not None and transport.is_active():
                raise
            # The link died (a reset on the path, the host's sshd restarted): open it again
            # the verified way, once, as testinfra would have done its own way.
            close_client(self.client)
            self.__dict__["client"] = self.reopen()
            rc, stdout, stderr = self._exec_command(cmd)
        return self.result(rc, cmd, stdout, stderr)


def _check_sudo(client: paramiko.SSHClient, name: str, user: str) -> None:
    """HostUnreachable unless sudo runs without a password: the checks cannot answer one."""
    try:
        with bounded(
            client,
            CONNECT_TIMEOUT,
            f"{name}: `sudo -n true` got no answer within {CONNECT_TIMEOUT} s",
        ):
            _, out, err = client.exec_command("sudo -n true", timeout=CONNECT_TIMEOUT)
            rc = out.channel.recv_exit_status()
            msg = " ".join(err.read().decode(errors="replace").split())[:200]
    except (paramiko.SSHException, OSError) as e:
        raise HostUnreachable(f"{name}: cannot run sudo: {e}") from e
    if rc != 0:
        raise HostUnreachable(
            f"{name}: sudo as {user} asks for a password ({msg or f'exit {rc}'}); give {user} "
            "passwordless sudo"
        )
