"""`ipvs-fleet check` exit code 2 paths: one clear message, no traceback."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from ipvs_fleet.cli import main


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed again when the block ends


def test_missing_inventory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(tmp_path / "nope.py")]) == 2
    err = capsys.readouterr().err
    assert "nope.py: inventory file not found" in err and "Traceback" not in err


def test_an_inventory_that_raises_is_named_with_its_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # as inventory/lab.py does with no lab running: the file's own exception, no traceback
    inv = tmp_path / "inv.py"
    inv.write_text('raise RuntimeError("no lab state in .lab (run: ipvs-fleet lab up)")\n')
    assert main(["check", str(inv)]) == 2
    err = capsys.readouterr().err
    assert f"{inv}: cannot load inventory: RuntimeError: no lab state in .lab" in err, err
    assert "Traceback" not in err


def test_waiver_without_justification(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inv = tmp_path / "inv.py"
    inv.write_text('hosts = [("h1", {"ipvs_host_class": "k8s_node"})]\n')
    w = tmp_path / "waivers.yml"
    w.write_text("waivers:\n  - host: h1\n    check: sysctls\n    expires: 2030-01-01\n")
    assert main(["check", str(inv), "--waivers", str(w)]) == 2
    err = capsys.readouterr().err
    assert f"{w}: waivers[0] (host h1): a waiver needs a justification" in err


def test_unknown_host_class(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inv = tmp_path / "inv.py"
    inv.write_text('hosts = [("h1", {"ipvs_host_class": "nginx"})]\n')
    assert main(["check", str(inv)]) == 2
    assert "host h1: unknown host class 'nginx'" in capsys.readouterr().err


def test_unreachable_host_is_could_not_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    known = tmp_path / "known_hosts"
    known.write_text("")
    inv = tmp_path / "inv.py"
    inv.write_text(
        f'hosts = [("gone", {{"ipvs_host_class": "k8s_node", "ssh_hostname": "127.0.0.1", '
        f'"ssh_port": {_closed_port()}, "ssh_known_hosts_file": "{known}"}})]\n'
    )
    out_json = tmp_path / "r.json"
    assert main(["check", str(inv), "--json", str(out_json)]) == 2
    cap = capsys.readouterr()
    assert "gone: could not check (13 checks)" in cap.out
    assert "HostUnreachable: 127.0.0.1:" in cap.out and "Traceback" not in cap.out
    assert "could not check: gone" in cap.err
    doc = json.loads(out_json.read_text())
    assert doc["exit_code"] == 2 and doc["classes"]["k8s_node"]["not_checked"] == ["gone"]


@pytest.mark.parametrize("bad", ["0", "-5", "soon", "nan", "inf"])
def test_command_timeout_must_be_seconds_above_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: str
) -> None:
    inv = tmp_path / "inv.py"
    inv.write_text('hosts = [("h1", {"ipvs_host_class": "k8s_node"})]\n')
    with pytest.raises(SystemExit) as e:
        main(["check", str(inv), "--command-timeout", bad])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"--command-timeout: a number of seconds above 0, not {bad!r}" in err, err
    assert "Traceback" not in err


def test_the_checks_command_timeout_reaches_pytest() -> None:
    from ipvs_fleet.compliance.runner import pytest_args

    args = pytest_args("inv.py", command_timeout=7.5)
    assert args[args.index("--command-timeout") + 1] == "7.5"
