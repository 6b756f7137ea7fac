"""One SSH connection per host, host keys checked, wrapped as a testinfra Host.

The host's ssh_config (HostName, User, Port, IdentityFile, ProxyJump) is honoured as ssh and
pyinfra honour it; the inventory's ssh_* host data win over it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko
import testinfra.host
from testinfra.backend.paramiko import ParamikoBackend

from ipvs_fleet.compliance.inventory import FleetHost

CONNECT_TIMEOUT = 15


class HostUnreachable(Exception):
    """The host could not be reached or authenticated: its checks cannot run."""


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
    return client


def connect(fh: FleetHost) -> testinfra.host.Host:
    """A testinfra Host over one paramiko connection built from pyinfra ssh_* host data and
    the host's ssh_config (`ssh_config_file` host data, else ~/.ssh/config).

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
                "direct-tcpip", (nxt.hostname, nxt.port), ("127.0.0.1", 0),
                timeout=CONNECT_TIMEOUT,
            )  # fmt: skip
        except (paramiko.SSHException, OSError) as e:
            raise HostUnreachable(
                f"{hop.hostname}:{hop.port}: cannot reach {nxt.hostname}:{nxt.port}: {e}"
            ) from e
    client = _open(target, known, d.get("ssh_password") or None, sock)
    client.__dict__["ipvs_fleet_hops"] = hops  # the jump connections live as long as it
    sudo = bool(d.get("_sudo"))
    if sudo:
        _check_sudo(client, fh.name, str(target.user or "the SSH user"))
    # testinfra's own paramiko backend would accept unknown keys (WarningPolicy); hand it
    # this already-verified client instead of letting it connect. With `_sudo` (pyinfra's
    # host data) every command runs through sudo, as the deploy's do.
    backend = ParamikoBackend(
        f"paramiko://{fh.name}", sudo=sudo, sudo_user=d.get("_sudo_user") or None
    )
    backend.__dict__["client"] = client
    return testinfra.host.Host(backend)


def _check_sudo(client: paramiko.SSHClient, name: str, user: str) -> None:
    """HostUnreachable unless sudo runs without a password: the checks cannot answer one."""
    try:
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
