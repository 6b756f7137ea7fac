"""The checks' SSH connection honours ssh_config (HostName, User, Port, IdentityFile,
ProxyJump) with host keys strict, against real SSH servers on loopback.

The machine has no OpenSSH server; the servers here are paramiko's server side (a real SSH
handshake, public-key auth, direct-tcpip forwarding for ProxyJump), one thread each.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paramiko
import pytest
from paramiko.common import (
    AUTH_FAILED,
    AUTH_SUCCESSFUL,
    OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED,
    OPEN_SUCCEEDED,
)

from ipvs_fleet.compliance.inventory import FleetHost
from ipvs_fleet.compliance.remote import CommandTimeout, HostUnreachable, connect, resolve


class _Iface(paramiko.ServerInterface):
    def __init__(self, server: SshServer) -> None:
        self.server = server
        self.forward: dict[int, tuple[str, int]] = {}

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        if key.get_base64() != self.server.client_key.get_base64():
            return AUTH_FAILED
        self.server.log.append(("auth", username))
        return AUTH_SUCCESSFUL

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind == "session" and self.server.hang:
            return OPEN_SUCCEEDED
        return OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        self.server.log.append(("exec", command.decode()))
        return self.server.hang

    def check_channel_direct_tcpip_request(
        self, chanid: int, origin: tuple[str, int], destination: tuple[str, int]
    ) -> int:
        self.server.log.append(("forward", destination))
        self.forward[chanid] = destination
        return OPEN_SUCCEEDED


def _pump(src: Any, dst: Any) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            s.close()


class SshServer:
    """An SSH server on 127.0.0.1 that accepts one client key and forwards direct-tcpip."""

    def __init__(self, client_key: paramiko.PKey) -> None:
        self.host_key = paramiko.ECDSAKey.generate()
        self.client_key = client_key
        self.log: list[tuple[str, Any]] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.transports: list[paramiko.Transport] = []
        self.hang = False  # accept commands, never answer them (a hung host)
        self.held: list[paramiko.Channel] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def known_hosts_line(self) -> str:
        return f"[127.0.0.1]:{self.port} {self.host_key.get_name()} {self.host_key.get_base64()}\n"

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        t = paramiko.Transport(conn)
        self.transports.append(t)
        t.add_server_key(self.host_key)
        iface = _Iface(self)
        try:
            t.start_server(server=iface)
        except (paramiko.SSHException, EOFError):
            return
        while t.is_active():
            chan = t.accept(0.5)
            if chan is None:
                continue
            dest = iface.forward.pop(chan.get_id(), None)
            if dest is None:
                if self.hang:
                    self.held.append(chan)
                else:
                    chan.close()
                continue
            out = socket.create_connection(dest)
            threading.Thread(target=_pump, args=(chan, out), daemon=True).start()
            threading.Thread(target=_pump, args=(out, chan), daemon=True).start()

    def close(self) -> None:
        self.sock.close()
        for t in self.transports:
            t.close()


@pytest.fixture
def key(tmp_path: Path) -> tuple[paramiko.PKey, Path]:
    k = paramiko.ECDSAKey.generate()
    path = tmp_path / "id_fleet"
    k.write_private_key_file(str(path))
    return k, path


@pytest.fixture
def servers(key: tuple[paramiko.PKey, Path]) -> Iterator[tuple[SshServer, SshServer]]:
    """(target, jump host), both accepting the test's key."""
    target, jump = SshServer(key[0]), SshServer(key[0])
    yield target, jump
    target.close()
    jump.close()


def _close(host: Any) -> None:
    client = host.backend.client
    for hop in client.__dict__.get("ipvs_fleet_hops", []):
        hop.close()
    client.close()


def test_ssh_config_gives_hostname_user_port_and_identity(
    tmp_path: Path,
    key: tuple[paramiko.PKey, Path],
    servers: tuple[SshServer, SshServer],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    target, _ = servers
    monkeypatch.setenv("HOME", str(tmp_path))
    known = tmp_path / "known_hosts"
    known.write_text(target.known_hosts_line())
    fh = FleetHost("canary", ("k8s_nodes",), {"ssh_known_hosts_file": str(known)})
    with pytest.raises(HostUnreachable):  # no config: "canary" is no host name
        connect(fh)
    (tmp_path / ".ssh").mkdir()
    (tmp_path / ".ssh" / "config").write_text(
        f"Host canary\n  HostName 127.0.0.1\n  Port {target.port}\n  User fleet\n"
        f"  IdentityFile {key[1]}\n"
    )
    host = connect(fh)  # ~/.ssh/config, as ssh reads it
    try:
        assert host.backend.client.get_transport().is_authenticated()
        assert target.log == [("auth", "fleet")]
    finally:
        _close(host)


def test_proxy_jump_with_every_host_key_checked(
    tmp_path: Path, key: tuple[paramiko.PKey, Path], servers: tuple[SshServer, SshServer]
) -> None:
    target, jump = servers
    cfg = tmp_path / "ssh_config"
    cfg.write_text(
        f"Host bastion\n  HostName 127.0.0.1\n  Port {jump.port}\n  User hop\n"
        f"  IdentityFile {key[1]}\n"
        f"Host canary\n  HostName 127.0.0.1\n  Port {target.port}\n  User fleet\n"
        f"  IdentityFile {key[1]}\n  ProxyJump bastion\n"
    )
    known = tmp_path / "known_hosts"
    data = {"ssh_config_file": str(cfg), "ssh_known_hosts_file": str(known)}
    known.write_text(target.known_hosts_line())  # the jump host's key is not known
    with pytest.raises(HostUnreachable, match=f"127.0.0.1:{jump.port}: .*not found in known"):
        connect(FleetHost("canary", (), data))
    assert target.log == []
    known.write_text(target.known_hosts_line() + jump.known_hosts_line())
    host = connect(FleetHost("canary", (), data))
    try:
        assert jump.log == [("auth", "hop"), ("forward", ("127.0.0.1", target.port))]
        assert target.log == [("auth", "fleet")]
    finally:
        _close(host)


def test_an_ssh_config_does_not_loosen_host_keys(
    tmp_path: Path, key: tuple[paramiko.PKey, Path], servers: tuple[SshServer, SshServer]
) -> None:
    target, _ = servers
    cfg = tmp_path / "ssh_config"
    cfg.write_text(
        f"Host canary\n  HostName 127.0.0.1\n  Port {target.port}\n"
        f"  IdentityFile {key[1]}\n  StrictHostKeyChecking no\n"
    )
    known = tmp_path / "known_hosts"
    known.write_text("")
    with pytest.raises(HostUnreachable, match="not found in known_hosts"):
        connect(
            FleetHost(
                "canary", (), {"ssh_config_file": str(cfg), "ssh_known_hosts_file": str(known)}
            )
        )
    assert target.log == []


def test_inventory_data_wins_over_ssh_config(tmp_path: Path) -> None:
    key = tmp_path / "k"
    key.write_text("")
    cfg = paramiko.SSHConfig.from_text(
        f"Host canary\n  HostName 10.0.0.5\n  Port 2222\n  User cfg\n  IdentityFile {key}\n"
        "  ProxyJump a@j1:2200,j2\n"
    )
    t = resolve("canary", {}, cfg)
    assert (t.hostname, t.port, t.user, t.keys, t.jump) == (
        "10.0.0.5",
        2222,
        "cfg",
        (str(key),),
        ("a@j1:2200", "j2"),
    )
    t = resolve("canary", {"ssh_port": 22, "ssh_user": "inv", "ssh_key": "/k2"}, cfg)
    assert (t.port, t.user, t.keys, t.explicit_key) == (22, "inv", ("/k2",), True)
    t = resolve("other", {}, cfg)
    assert (t.hostname, t.port, t.user, t.jump) == ("other", 22, None, ())


def test_a_named_ssh_config_file_that_is_missing_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(HostUnreachable, match="ssh_config_file .*nope not found"):
        connect(FleetHost("h", (), {"ssh_config_file": str(tmp_path / "nope")}))


def test_a_command_that_never_answers_is_bounded_and_the_host_not_retried(
    tmp_path: Path, key: tuple[paramiko.PKey, Path], servers: tuple[SshServer, SshServer]
) -> None:
    target, _ = servers
    target.hang = True
    known = tmp_path / "known_hosts"
    known.write_text(target.known_hosts_line())
    data = {
        "ssh_hostname": "127.0.0.1",
        "ssh_port": target.port,
        "ssh_key": str(key[1]),
        "ssh_known_hosts_file": str(known),
    }
    host = connect(FleetHost("hung", (), data), command_timeout=1)
    try:
        t0 = time.monotonic()
        with pytest.raises(CommandTimeout, match="hung: no answer within 1 s .* to `cat /proc"):
            host.run("cat /proc/sys/net/ipv4/vs/conn_reuse_old_conntrack")
        assert time.monotonic() - t0 < 5
        # The host is hung: its next command fails at once, without a new connection.
        t0 = time.monotonic()
        with pytest.raises(CommandTimeout, match="hung: no answer within 1 s .* to `cat /proc"):
            host.run("true")
        assert time.monotonic() - t0 < 0.5
        assert len(target.transports) == 1
        assert [e for e in target.log if e[0] == "exec"] == [
            ("exec", "cat /proc/sys/net/ipv4/vs/conn_reuse_old_conntrack")
        ]
    finally:
        _close(host)
