"""Mutated input files against every loader, through the CLI: a clean error naming the file
(exit 2) or the input accepted, never a traceback.

Each valid example (the packaged policy and rollout config, a waivers file, a journal, a
host's data) is mutated by hypothesis: keys dropped or added, values of the wrong type, out
of range or impossible dates, a non-mapping document, broken YAML or bytes. The rollout CLI
reads the policy, the rollout config, the journal and the inventory's host data before it
starts its runner, which is replaced here by one that stops the run (`Reached`: the input
was accepted, no host is touched); the check CLI reads the waivers before the inventory,
whose host has an unknown class (the error that says the waivers were accepted).
Derandomized, so CI tries the same inputs each run; each test prints how many it tried.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipvs_fleet.cli import main
from ipvs_fleet.resources import POLICY_ENV, ROLLOUT, policy_file
from ipvs_fleet.rollout import cli as rollout_cli

EXAMPLES = 100  # per loader: 1-4 s each
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)

JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from([0, -1, 1, 101, 1001, 2**63, 1.5, float("nan"), float("inf")]),
    st.integers(),
    st.floats(),
    st.sampled_from(
        [
            "",
            " ",
            "false",
            "no",
            "yes",
            "2026-02-30",
            "2026-13-01",
            "10%",
            "150%",
            "all",
            "k8s_node",
            "reload",
            "0",
            "-1",
            "a b",
            "%",
            "h1",
        ]
    ),
    st.text(max_size=6),
    st.lists(st.sampled_from(["k8s_node", 1, None, "ip_vs"]), max_size=3),
    st.dictionaries(st.sampled_from(["min", "max", "hosts", "a"]), st.integers(), max_size=2),
)
BROKEN_YAML = [
    "[",
    "{",
    ": :",
    "\t",
    "'",
    '"',
    "&a [*a]",
    "*nope",
    "!!int x",
    "- ",
    "a: b: c",
    "!!python/object:os.system 1",
    "? [a]\n: 1",
    "%YAML 9",
    "\x00",
    "2026-02-30",
    "\udcff",
]


@dataclass
class Tally:
    tried: int = 0
    rejected: int = 0
    accepted: int = 0
    messages: list[str] = field(default_factory=list)

    def report(self, what: str) -> str:
        return (
            f"{what}: {self.tried} mutated inputs, {self.rejected} rejected with a clean "
            f"error (exit 2), {self.accepted} accepted"
        )


def paths(doc: Any, here: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path into a document (the root too)."""
    out = [here]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += paths(v, (*here, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += paths(v, (*here, i))
    return out


def at(doc: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        doc = doc[p]
    return doc


def mutate(data: st.DataObject, doc: Any) -> Any:
    """One structural mutation of a copy of `doc`."""
    doc = json.loads(json.dumps(doc))
    path = data.draw(st.sampled_from(paths(doc)), label="path")
    op = data.draw(st.sampled_from(["drop", "junk", "extra", "wrap", "root"]), label="op")
    if op == "root" or not path:
        return data.draw(JUNK, label="root")
    parent, key = at(doc, path[:-1]), path[-1]
    if op == "drop":
        del parent[key]
    elif op == "junk":
        parent[key] = data.draw(JUNK, label="value")
    elif op == "wrap":
        parent[key] = [parent[key]]
    else:
        target = parent[key] if isinstance(parent[key], dict) else parent
        if isinstance(target, dict):
            target[data.draw(st.sampled_from(["colour", "hosts", "min", "ipvs_colour"]))] = 1
        else:
            target.append(data.draw(JUNK, label="item"))
    return doc


def yaml_text(data: st.DataObject, doc: Any) -> str:
    """The mutated document as YAML, or its valid YAML broken as text."""
    text = yaml.safe_dump(doc, sort_keys=False)
    how = data.draw(st.sampled_from(["tree"] * 4 + ["insert", "truncate", "date"]), label="text")
    if how == "tree":
        return yaml.safe_dump(mutate(data, doc), sort_keys=False, allow_unicode=True)
    if how == "truncate":
        return text[: data.draw(st.integers(0, len(text)), label="cut")]
    if how == "date":  # an unquoted impossible date where a value was
        return re.sub(r": [^\n]+", ": 2026-02-30", text, count=data.draw(st.integers(1, 3)))
    pos = data.draw(st.integers(0, len(text)), label="pos")
    return text[:pos] + data.draw(st.sampled_from(BROKEN_YAML), label="insert") + text[pos:]


def write(path: Path, text: str) -> None:
    path.write_bytes(text.encode("utf-8", "surrogateescape"))


class Reached(Exception):
    """The rollout CLI accepted every input and built its runner: nothing was refused."""


class StopRunner:
    def __init__(self, **kw: Any) -> None:
        raise Reached


HOST = {
    "ipvs_host_class": "k8s_node",
    "ipvs_sysctls": {"conn_reuse_old_conntrack": 0},
    "ipvs_latency_budget": {"p99_ms": 5},
    "ipvs_activation": "reload",
    "ipvs_pre_activate": ["true"],
    "ipvs_lock_wait_seconds": 30,
}
JOURNAL = [
    {
        "ts": 1.0,
        "event": "start",
        "run": 1,
        "inventory": "inv.py",
        "waves": [["1", ["h1"]]],
        "resume": False,
        "limit": [],
    },
    {"ts": 2.0, "event": "host", "host": "h1", "state": "deploying", "wave": 1, "detail": ""},
    {
        "ts": 3.0,
        "event": "host",
        "host": "h1",
        "state": "verified",
        "wave": 1,
        "detail": "",
        "set": "set-a",
    },
    {"ts": 4.0, "event": "wave", "wave": 1, "passed": True, "failed": []},
    {"ts": 5.0, "event": "end", "outcome": "halted"},
]
WAIVERS = {
    "waivers": [
        {"host": "h1", "check": "sysctls", "justification": "T-1", "expires": "2030-01-31"},
        {"group": "g", "check": "patched_module", "justification": "T-2", "expires": "2030-02-28"},
    ]
}


def inventory_text(host: Any) -> str:
    return (
        f"import json\ncanary = [('h1', {{**json.loads({json.dumps(json.dumps(host))}), "
        "'ssh_hostname': '127.0.0.1', 'ssh_port': 9})]\n"
    )


@pytest.fixture
def rollout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., tuple[str, str]]:
    """fn(**files) -> ("rejected" | "accepted", stderr): the rollout CLI on the valid files
    with the given ones replaced."""
    monkeypatch.setattr(rollout_cli, "PyinfraRunner", StopRunner)
    # main() exports --policy to the environment: set here, so that it is undone after
    monkeypatch.setenv(POLICY_ENV, str(policy_file()))
    count = itertools.count()
    files = {
        "policy": (tmp_path / "host_classes.yml", policy_file().read_text()),
        "config": (tmp_path / "rollout.yml", policy_file(ROLLOUT).read_text()),
        "journal": (tmp_path / "j.jsonl", "".join(json.dumps(r) + "\n" for r in JOURNAL)),
        "inventory": (tmp_path / "inv.py", inventory_text(HOST)),
    }

    def run(capsys: pytest.CaptureFixture[str], **given_: str) -> tuple[str, str]:
        for name, (p, text) in files.items():
            write(p, given_.get(name, text))
        inv = files["inventory"][0]
        if "inventory" in given_:  # pyinfra caches an inventory's code by its file name
            inv = tmp_path / f"inv{next(count)}.py"
            write(inv, given_["inventory"])
        argv = [
            "rollout",
            str(inv),
            "--new",
            "--journal",
            str(files["journal"][0]),
            "--config",
            str(files["config"][0]),
            "--policy",
            str(files["policy"][0]),
        ]
        try:
            rc = main(argv)
        except Reached:
            return "accepted", capsys.readouterr().err
        err = capsys.readouterr().err
        assert rc == 2, (rc, err)
        return "rejected", err

    return run


def check_clean(tally: Tally, outcome: str, err: str, names: tuple[str, ...]) -> None:
    tally.tried += 1
    assert "Traceback" not in err and "INTERNALERROR" not in err, err
    if outcome == "rejected":
        tally.rejected += 1
        assert err.startswith("ipvs-fleet: error: "), err
        assert any(n in err for n in names), (names, err)
        tally.messages.append(err)
    else:
        tally.accepted += 1


def test_mutated_policy_files(rollout, capsys, tmp_path):
    valid = yaml.safe_load(policy_file().read_text())
    tally = Tally()

    @FUZZ
    @given(st.data())
    def one(data: st.DataObject) -> None:
        outcome, err = rollout(capsys, policy=yaml_text(data, valid))
        # a policy that loads may still refuse the host's data or class: that names the host
        check_clean(tally, outcome, err, (str(tmp_path / "host_classes.yml"), "host h1: "))

    one()
    print(tally.report("policy"))
    assert tally.tried >= EXAMPLES and tally.rejected > tally.tried // 2


def test_mutated_rollout_configs(rollout, capsys, tmp_path):
    valid = yaml.safe_load(policy_file(ROLLOUT).read_text())
    tally = Tally()

    @FUZZ
    @given(st.data())
    def one(data: st.DataObject) -> None:
        outcome, err = rollout(capsys, config=yaml_text(data, valid))
        # a config that loads may name a wave group the inventory lacks ("wave 'x': ...")
        check_clean(tally, outcome, err, (str(tmp_path / "rollout.yml"), "wave "))

    one()
    print(tally.report("rollout config"))
    assert tally.tried >= EXAMPLES and tally.rejected > tally.tried // 2


def test_mutated_journals(rollout, capsys, tmp_path):
    tally = Tally()

    @FUZZ
    @given(st.data())
    def one(data: st.DataObject) -> None:
        if data.draw(st.booleans(), label="torn"):  # a controller killed mid-write
            text = "".join(json.dumps(r) + "\n" for r in JOURNAL)
            text = text[: data.draw(st.integers(0, len(text)))]
        else:
            recs = mutate(data, JOURNAL)
            recs = recs if isinstance(recs, list) else [recs]
            text = "".join(json.dumps(r) + "\n" for r in recs)
        outcome, err = rollout(capsys, journal=text)
        check_clean(tally, outcome, err, (f"{tmp_path / 'j.jsonl'}:",))

    one()
    print(tally.report("journal"))
    assert tally.tried >= EXAMPLES and tally.rejected > tally.tried // 4


def test_mutated_host_data(rollout, capsys, tmp_path):
    tally = Tally()

    @FUZZ
    @given(st.data())
    def one(data: st.DataObject) -> None:
        outcome, err = rollout(capsys, inventory=inventory_text(mutate(data, HOST)))
        check_clean(tally, outcome, err, ("host h1: ", f"{tmp_path}/inv"))

    one()
    print(tally.report("inventory host data"))
    assert tally.tried >= EXAMPLES and tally.rejected > tally.tried // 2


def test_mutated_waivers(tmp_path, capsys):
    inv = tmp_path / "inv.py"
    inv.write_text(inventory_text({"ipvs_host_class": "accepted-waivers"}))
    w = tmp_path / "waivers.yml"
    tally = Tally()

    @FUZZ
    @given(st.data())
    def one(data: st.DataObject) -> None:
        write(w, yaml_text(data, WAIVERS))
        rc = main(["check", str(inv), "--waivers", str(w)])
        err = capsys.readouterr().err
        assert rc == 2, err
        accepted = "unknown host class 'accepted-waivers'" in err
        check_clean(
            tally,
            "accepted" if accepted else "rejected",
            err.replace("ERROR: ", "ipvs-fleet: error: ", 1),
            (str(w),),
        )

    one()
    print(tally.report("waivers"))
    assert tally.tried >= EXAMPLES and tally.rejected > tally.tried // 2
