"""The probe's guest files: one list, shipped whole by every copier, standard library only.

The files run on a host's own python3 (3.9 on bullseye) as siblings in one folder, with no
ipvs_fleet installed there; here they run the same way, from a copy of exactly that list.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ipvs_fleet.compliance import latency
from ipvs_fleet.probe import GUEST_FILES, harness

PROBE_DIR = Path(harness.__file__).parent
ENTRY_POINTS = ("scenario.py", "probe.py")


def _sibling_imports(name: str) -> set[str]:
    """The guest files `name` imports as siblings (`import cells` in its guest branch)."""
    found = set()
    for node in ast.walk(ast.parse((PROBE_DIR / name).read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if (PROBE_DIR / f"{alias.name}.py").is_file():
                    found.add(f"{alias.name}.py")
    return found


def test_every_copier_ships_the_one_list() -> None:
    assert harness.GUEST_FILES is GUEST_FILES
    assert latency.PROBE_FILES is GUEST_FILES


def test_the_list_is_what_the_entry_points_import() -> None:
    closure, todo = set(ENTRY_POINTS), list(ENTRY_POINTS)
    while todo:
        for dep in _sibling_imports(todo.pop()) - closure:
            closure.add(dep)
            todo.append(dep)
    assert sorted(GUEST_FILES) == sorted(closure)
    assert len(set(GUEST_FILES)) == len(GUEST_FILES)


@pytest.mark.parametrize("name", GUEST_FILES)
def test_guest_file_parses_as_python_39(name: str) -> None:
    # bullseye guests have Python 3.9: no match, no parenthesised with-items, etc.
    ast.parse((PROBE_DIR / name).read_text(), feature_version=(3, 9))


def test_guest_module_names_do_not_shadow_the_standard_library() -> None:
    # the script's folder comes first on a guest's sys.path
    assert not {n.removesuffix(".py") for n in GUEST_FILES} & sys.stdlib_module_names


def _guest_copy(tmp_path: Path) -> Path:
    for name in GUEST_FILES:
        (tmp_path / name).write_text((PROBE_DIR / name).read_text())
    return tmp_path


def _guest_python(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # -S: no site-packages (no ipvs_fleet, nothing installed); -E -s: no PYTHON* or user site
    return subprocess.run(
        [sys.executable, "-S", "-E", "-s", *args],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_guest_files_import_only_the_standard_library(tmp_path: Path) -> None:
    folder = _guest_copy(tmp_path)
    mods = [n.removesuffix(".py") for n in GUEST_FILES]
    code = (
        f"import sys\nfor m in {mods!r}: __import__(m)\n"
        "import json; print(json.dumps(sorted(n for n, m in sys.modules.items()"
        " if n.split('.')[0] not in sys.stdlib_module_names"
        " and n not in sys.builtin_module_names and n != '__main__')))"
    )
    r = _guest_python(folder, "-c", code)
    assert r.returncode == 0, r.stderr
    assert sorted(json.loads(r.stdout)) == sorted(mods)


def test_guest_entry_point_runs_from_the_copied_folder(tmp_path: Path) -> None:
    folder = _guest_copy(tmp_path)
    r = _guest_python(
        folder, str(folder / "scenario.py"), "rules", '{"ruleset": "calico", "family": 6}'
    )
    assert r.returncode == 0, r.stderr
    assert "-A KUBE-SERVICES" in r.stdout and "-A cali-PREROUTING" in r.stdout
    assert "-A -u [fd10:1::1]:30053 -s rr" in r.stdout  # the IPVS services
    r = _guest_python(folder, str(folder / "probe.py"), "--help")
    assert r.returncode == 0, r.stderr
