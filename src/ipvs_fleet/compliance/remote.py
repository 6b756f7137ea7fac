"""One SSH connection per host, host keys checked, wrapped as a testinfra Host."""

from __future__ import annotations

import os
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


def connect(fh: FleetHost) -> testinfra.host.Host:
    """A testinfra Host over one paramiko connection built from pyinfra ssh_* host data.

    Host keys are checked against `ssh_known_hosts_file` (else the user's known_hosts);
    an unknown or changed key refuses the connection. Raises HostUnreachable with the reason.
    """
    d = fh.data
    hostname = str(d.get("ssh_hostname") or fh.name)
    port = int(d.get("ssh_port") or 22)
    client = paramiko.SSHClient()
    known = _expand(d.get("ssh_known_hosts_file"))
    try:
        if known:
            client.load_host_keys(known)
        else:
            client.load_system_host_keys()
    except OSError as e:
        raise HostUnreachable(f"cannot read known hosts file {known}: {e.strerror}") from e
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    key = _expand(d.get("ssh_key"))
    if key and not Path(key).is_file():
        raise HostUnreachable(f"ssh_key {key} not found")
    try:
        client.connect(
            hostname,
            port=port,
            username=d.get("ssh_user") or None,
            key_filename=key,
            password=d.get("ssh_password") or None,
            timeout=CONNECT_TIMEOUT,
            banner_timeout=CONNECT_TIMEOUT,
            auth_timeout=CONNECT_TIMEOUT,
            allow_agent=key is None,
            look_for_keys=key is None,
        )
    except paramiko.BadHostKeyException as e:
        raise HostUnreachable(f"{hostname}:{port}: host key changed (not {known})") from e
    except paramiko.SSHException as e:
        raise HostUnreachable(f"{hostname}:{port}: {e}") from e
    except (TimeoutError, OSError) as e:
        raise HostUnreachable(f"{hostname}:{port}: {e.strerror or e}") from e
    sudo = bool(d.get("_sudo"))
    if sudo:
        _check_sudo(client, fh.name, str(d.get("ssh_user") or "the SSH user"))
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
