"""One spelling per option across the subcommands (--dry, --json PATH), the old spellings as
hidden aliases that still work and say so in one line, and help texts in plain text."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipvs_fleet.cli import parser

# (argv before the option, dest) of every subcommand with a dry run / a JSON output file.
DRY = {
    "pins update": (["pins", "update"], "dry"),
    "lab prune": (["lab", "prune"], "dry"),
    "rollout": (["rollout", "inv.py"], "dry"),
}
JSON = {
    "check": (["check", "inv.py"], "json_path"),
    "rollout": (["rollout", "inv.py"], "json_out"),
    "probe scenario": (["probe", "scenario", "--host", "h"], "json"),
    "probe connect": (["probe", "connect", "10.0.0.1:80"], "json"),
}
OLD_DRY = {
    "pins update": ["-n", "--dry-run"],
    "lab prune": ["-n", "--dry-run"],
    "rollout": ["--plan"],
}
OLD_JSON = {"probe scenario": ["-o", "--output"], "probe connect": ["-o", "--output"]}
# Markdown that argparse prints as is: inline code, bold, a heading, a fenced block.
MARKDOWN = re.compile(r"`|\*\*|^#+ |^```", re.MULTILINE)


def subparsers(p: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """`p` and every parser below it (subcommands of subcommands too)."""
    yield p
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from subparsers(child)


def test_every_subcommand_is_walked() -> None:
    progs = {p.prog for p in subparsers(parser())}
    assert {
        "ipvs-fleet build",
        "ipvs-fleet pins update",
        "ipvs-fleet probe connect",
        "ipvs-fleet lab prune",
        "ipvs-fleet init",
    } <= progs


@pytest.mark.parametrize("p", list(subparsers(parser())), ids=lambda p: p.prog)
def test_help_has_no_markdown(p: argparse.ArgumentParser) -> None:
    text = p.format_help()
    bad = [ln.strip() for ln in text.splitlines() if MARKDOWN.search(ln)]
    assert not bad, f"{p.prog} --help shows Markdown: {bad}"


@pytest.mark.parametrize("name", DRY)
def test_dry_run_is_spelled_dry(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv, dest = DRY[name]
    assert getattr(parser().parse_args(argv), dest) is False
    assert getattr(parser().parse_args([*argv, "--dry"]), dest) is True
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("name,old", [(n, o) for n, olds in OLD_DRY.items() for o in olds])
def test_old_dry_run_spellings_still_work_with_a_note(
    name: str, old: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, dest = DRY[name]
    assert getattr(parser().parse_args([*argv, old]), dest) is True
    err = capsys.readouterr().err
    assert err == f"ipvs-fleet {name}: note: {old} is deprecated, use --dry\n"


@pytest.mark.parametrize("name", JSON)
def test_json_output_is_spelled_json(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, dest = JSON[name]
    assert getattr(parser().parse_args(argv), dest) is None
    got = getattr(parser().parse_args([*argv, "--json", str(tmp_path / "r.json")]), dest)
    assert Path(got) == tmp_path / "r.json"
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("name,old", [(n, o) for n, olds in OLD_JSON.items() for o in olds])
def test_old_json_spellings_still_work_with_a_note(
    name: str, old: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, dest = JSON[name]
    assert Path(getattr(parser().parse_args([*argv, old, "r.json"]), dest)) == Path("r.json")
    err = capsys.readouterr().err
    assert err == f"ipvs-fleet {name}: note: {old} is deprecated, use --json\n"


def test_old_spellings_are_hidden_from_help() -> None:
    helps = {p.prog: p.format_help() for p in subparsers(parser())}
    for name, olds in {**OLD_DRY, **OLD_JSON}.items():
        text = helps[f"ipvs-fleet {name}"]
        assert not [o for o in olds if re.search(rf"(^|[\s\[,]){o}\b", text)], text
    for name in DRY:
        assert "--dry " in helps[f"ipvs-fleet {name}"]
