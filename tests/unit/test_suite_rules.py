"""Rules of the test suite itself, read from its source: nothing a test starts can hang it
(every subprocess call and wait has a timeout, and pytest-timeout backs them up), every
registered marker selects tests, and the module builds stay out of the unit tier."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"
SUBPROCESS_CALLS = {"run", "call", "check_call", "check_output"}


def pytest_ini() -> dict[str, object]:
    conf = tomllib.loads((REPO / "pyproject.toml").read_text())
    return dict(conf["tool"]["pytest"]["ini_options"])


def sources() -> dict[Path, ast.Module]:
    return {p: ast.parse(p.read_text(), str(p)) for p in sorted(TESTS.rglob("*.py"))}


def without_timeout(tree: ast.Module) -> list[int]:
    """Lines of subprocess.run/call/check_* calls and of .wait()/.communicate() calls that
    pass no timeout."""
    bad = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        f = node.func
        kw = {k.arg for k in node.keywords}
        is_sub = (
            f.attr in SUBPROCESS_CALLS
            and isinstance(f.value, ast.Name)
            and f.value.id == "subprocess"
        )
        waits = f.attr in ("wait", "communicate") and not node.args
        if (is_sub or waits) and "timeout" not in kw:
            bad.append(node.lineno)
    return bad


def test_every_subprocess_call_and_wait_in_the_tests_has_a_timeout() -> None:
    bad = {
        str(p.relative_to(REPO)): lines
        for p, tree in sources().items()
        if (lines := without_timeout(tree))
    }
    assert bad == {}, f"subprocess calls without timeout= (file: lines): {bad}"


def test_a_global_test_timeout_covers_the_longest_lab_test() -> None:
    ini = pytest_ini()
    assert int(str(ini["timeout"])) >= 15 * 60  # the longest lab test takes about 8 minutes
    assert ini.get("timeout_method") == "signal"  # fixtures still tear down (the lab stops)


def markers_used() -> dict[str, set[str]]:
    """Marker name -> test files that set it (`pytest.mark.<name>` anywhere in the file)."""
    used: dict[str, set[str]] = {}
    for p, tree in sources().items():
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Attribute)
                and node.value.attr == "mark"
                and isinstance(node.value.value, ast.Name)
                and node.value.value.id == "pytest"
            ):
                used.setdefault(node.attr, set()).add(str(p.relative_to(TESTS)))
    return used


def test_every_registered_marker_is_set_by_some_test() -> None:
    registered = {str(m).split(":")[0].strip() for m in pytest_ini()["markers"]}  # type: ignore[attr-defined]
    used = markers_used()
    assert {"lab", "build", "destructive", "dkms"} <= registered
    assert {m: used.get(m) for m in registered if not used.get(m)} == {}


def test_builds_are_lab_tier_and_unit_tests_are_not() -> None:
    used = markers_used()
    assert used["build"] and used["build"] <= used["lab"]
    assert not any(f.startswith("unit/") for f in used["lab"] | used["build"])
