"""Bad input found in issue 31 (item 7): each gets a clear error naming the file (or host) and
the key, exit code 2 through the CLI, never a traceback (mutated input at large:
test_bad_input_fuzz)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

from ipvs_fleet.cli import main
from ipvs_fleet.compliance.session import open_session
from ipvs_fleet.deploy.plan import decide
from ipvs_fleet.errors import ConfigError, FleetError
from ipvs_fleet.policy import load_policy
from ipvs_fleet.rollout.config import load_config
from ipvs_fleet.rollout.journal import read_journal

REPO = Path(__file__).resolve().parents[2]
LIST_CLASS = "host h1: ipvs_host_class: must be a host class name, got ['k8s_node']"
NO_LAB = {"lockdown": "none", "sig_enforce": False, "secure_boot": False}


def load_filters() -> ModuleType:
    path = REPO / "ansible_collections/ipvs_fleet/fleet/plugins/filter/ipvs_fleet.py"
    spec = importlib.util.spec_from_file_location("ipvs_fleet_filters_bad_input", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def inventory(tmp_path: Path, data: str = '{"ipvs_host_class": "k8s_node"}') -> Path:
    inv = tmp_path / "inv.py"
    # 127.0.0.1:9: nothing listens; every error here comes before any connection.
    inv.write_text(f'hosts = [("h1", {{**{data}, "ssh_hostname": "127.0.0.1", "ssh_port": 9}})]\n')
    return inv


def test_a_waiver_with_an_impossible_date_is_named_through_the_check_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    w = tmp_path / "waivers.yml"
    w.write_text(
        "waivers:\n  - host: h1\n    check: sysctls\n    justification: T-1\n"
        "    expires: 2026-02-30\n"
    )
    assert main(["check", str(inventory(tmp_path)), "--waivers", str(w)]) == 2
    out = capsys.readouterr()
    assert f"{w}: waivers[0].expires: not a valid date: 2026-02-30" in out.err, out
    assert "INTERNALERROR" not in out.out + out.err and "Traceback" not in out.out + out.err


def test_a_list_as_host_class_is_named_by_the_pyinfra_preflight() -> None:
    with pytest.raises(ConfigError, match=LIST_CLASS.replace("[", r"\[").replace("]", r"\]")):
        decide("h1", {"ipvs_host_class": ["k8s_node"]}, "6.1.0-1-amd64", NO_LAB, {})


def test_a_list_as_host_class_is_named_by_the_checks_session(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        open_session(inventory(tmp_path, '{"ipvs_host_class": ["k8s_node"]}'))
    assert LIST_CLASS in str(e.value)


def test_a_list_as_host_class_is_named_by_the_check_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", str(inventory(tmp_path, '{"ipvs_host_class": ["k8s_node"]}'))]) == 2
    out = capsys.readouterr()
    assert LIST_CLASS in out.err and "INTERNALERROR" not in out.out + out.err, out


def test_a_list_as_host_class_is_named_by_the_ansible_filter() -> None:
    f = load_filters()
    with pytest.raises(f.AnsibleFilterError) as e:
        f.plan(f"{f.MARK}kernel\n6.1.0-1-amd64", "h1", {"ipvs_host_class": ["k8s_node"]}, "/x")
    assert LIST_CLASS in str(e.value)
    with pytest.raises(f.AnsibleFilterError) as e:
        f.rollback_plan(f"{f.MARK}kernel\n6.1.0-1-amd64", "h1", {"ipvs_host_class": ["k8s_node"]})
    assert LIST_CLASS in str(e.value)


def test_a_schema_bound_that_is_not_a_number_is_named(tmp_path: Path) -> None:
    f = tmp_path / "host_classes.yml"
    f.write_text("host_classes: {x: {sysctls: {}}}\nsysctl_schema: {a: {min: low, max: 1}}\n")
    with pytest.raises(ConfigError) as e:
        load_policy(f)
    assert f"{f}: sysctl_schema.a.min: must be an integer, got 'low'" in str(e.value)


@pytest.mark.parametrize("value", ['"false"', "'no'", "0", "yes please"])
def test_gate_checks_must_be_a_boolean(tmp_path: Path, value: str) -> None:
    p = tmp_path / "rollout.yml"
    p.write_text(f"waves: [1]\ngate:\n  checks: {value}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert f"{p}: gate.checks: must be true or false" in str(e.value)


@pytest.mark.parametrize(
    "text",
    [
        "gate: {timeout_seconds: 0}",
        "host_command_timeout_seconds: 0",
        "host_command_timeout_seconds: -5",
        "gate: {timeout_seconds: '900'}",
    ],
)
def test_a_timeout_must_be_positive_seconds(tmp_path: Path, text: str) -> None:
    p = tmp_path / "rollout.yml"
    p.write_text(f"waves: [1]\n{text}\n")
    key = "gate.timeout_seconds" if "gate" in text else "host_command_timeout_seconds"
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert f"{p}: {key}: must be a number of seconds > 0" in str(e.value)


def test_a_journal_record_without_host_names_the_file_and_line(tmp_path: Path) -> None:
    j = tmp_path / "j.jsonl"
    recs = [
        {"event": "start", "waves": [["1", ["h1"]]]},
        {"event": "host", "state": "deploying", "wave": 1},
    ]
    j.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with pytest.raises(ConfigError) as e:
        read_journal(j)
    assert f"{j}:2: host: required" in str(e.value)


@pytest.mark.parametrize(
    ("rec", "words"),
    [
        ({"event": "host", "host": "h1", "state": "deploying", "wave": "one"}, ["wave", "'one'"]),
        ({"event": "host", "host": "h1", "state": "sleeping", "wave": 1}, ["state", "'sleeping'"]),
        ({"event": "start", "waves": [["1"]]}, ["waves"]),
        ({"state": "deploying"}, ["event"]),
    ],
)
def test_a_malformed_journal_record_names_the_file_line_and_key(
    tmp_path: Path, rec: dict[str, object], words: list[str]
) -> None:
    j = tmp_path / "j.jsonl"
    j.write_text(json.dumps({"event": "start", "waves": [["1", ["h1"]]]}) + "\n" + json.dumps(rec))
    with pytest.raises(ConfigError) as e:
        read_journal(j)
    assert f"{j}:2: " in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_a_malformed_journal_is_exit_2_through_the_rollout_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    j = tmp_path / "j.jsonl"
    j.write_text(json.dumps({"event": "host", "state": "deploying", "wave": 1}) + "\n")
    assert main(["rollout", str(inventory(tmp_path)), "--journal", str(j), "--resume"]) == 2
    assert f"{j}:1: host: required" in capsys.readouterr().err


def test_fleet_error_still_catches_the_journal_error(tmp_path: Path) -> None:
    j = tmp_path / "j.jsonl"
    j.write_text("[1, 2]\n")
    with pytest.raises(FleetError, match=":1: "):
        read_journal(j)
