"""`ipvs-fleet build` builds the kernel lines at once (--jobs): each line's outcome is its
own, results keep the lines' order, a failure names its line after the others finished."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest

from ipvs_fleet import cli
from ipvs_fleet.build.cli import build_lines
from ipvs_fleet.errors import FleetError

PINS: list[Any] = [
    SimpleNamespace(line=line, kernel_release=f"{line}.0-1-cloud-amd64")
    for line in ("5.10", "6.1", "6.12")
]


def test_lines_build_at_once_and_results_keep_their_order() -> None:
    running, peak, lock = 0, 0, threading.Lock()

    def build_one(i: int, pin: Any) -> str:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.2 - 0.05 * i)  # the first line finishes last
        with lock:
            running -= 1
        return f"{i} {pin.line}"

    assert build_lines(PINS, 3, build_one) == ["1 5.10", "2 6.1", "3 6.12"]
    assert peak == 3


def test_a_failed_line_is_named_after_every_other_line_was_built(
    capsys: pytest.CaptureFixture[str],
) -> None:
    built = []

    def build_one(i: int, pin: Any) -> str:
        if pin.line == "6.1":
            raise FleetError("patch 0001 does not apply")
        time.sleep(0.1)
        built.append(pin.line)
        return pin.line

    with pytest.raises(
        FleetError,
        match=r"1 of 3 builds failed; first, 6\.1 6\.1\.0-1-cloud-"
        r"amd64: patch 0001 does not apply",
    ):
        build_lines(PINS, 3, build_one)
    assert sorted(built) == ["5.10", "6.12"]
    assert (
        "6.1 6.1.0-1-cloud-amd64: build failed: patch 0001 does not apply"
        in capsys.readouterr().out
    )


def test_one_job_builds_in_order_and_stops_at_the_first_failure() -> None:
    built = []

    def build_one(i: int, pin: Any) -> str:
        if pin.line == "6.1":
            raise FleetError("no space left")
        built.append(pin.line)
        return pin.line

    with pytest.raises(FleetError, match="no space left"):
        build_lines(PINS, 1, build_one)
    assert built == ["5.10"]


def test_jobs_below_one_is_refused_before_anything_is_resolved(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["build", "--all-lab", "--jobs", "0"]) == 2
    assert "--jobs must be 1 or more, not 0" in capsys.readouterr().err
