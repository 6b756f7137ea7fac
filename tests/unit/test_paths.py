"""The host paths ipvs-fleet owns are written once, in ipvs_fleet.paths.

Python imports them; the role (YAML, templates, shell) and the policy's comments spell them
out, so every spelling there must be one of ipvs_fleet.paths' values (or a file below one
of its folders).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from ipvs_fleet import paths
from ipvs_fleet.probe import GUEST_FILES, inflight
from tests.fixtures.wheel import REPO

# A host path of ipvs-fleet's, as code or a template writes it.
HOST_PATH = re.compile(
    r"(?:/etc/(?:sysctl|modprobe|modules-load)\.d/[\w.-]*ipvs-fleet[\w.-]*"
    r"|(?:/var/lib/dkms|/var/lib|/usr/src|/run|updates)/ipvs-fleet[\w.{}/<>-]*)"
)
VALUES = {v for k, v in vars(paths).items() if k.isupper()}
# inflight.py's state (a guest script, its own spelling): one folder per slot
PREFIXES = (
    paths.DKMS_SOURCE_PREFIX,
    inflight.STATE_PREFIX,
    *(
        d + "/"
        for d in (
            paths.STATE_DIR,
            paths.DKMS_TREE,
            paths.UPDATES_SUBDIR,
            paths.CHECK_DIR,
            paths.HELD_DIR,
        )
    ),
)
PYTHON_ROOTS = (
    "src/ipvs_fleet",
    "deploy",
    "checks",
    "inventory",
    "group_data",
    "bench",
    "deploy.py",
    "ansible_collections",
)
# Guest scripts run on a host without ipvs_fleet: probe's files, and inflight.py copied alone.
GUEST_SCRIPTS = {f"src/ipvs_fleet/probe/{n}" for n in (*GUEST_FILES, "inflight.py")}
# Being rewritten by issue 32's Ansible side (one module for every host command): they
# import ipvs_fleet.paths once that lands. An entry that no longer writes a path fails.
PENDING: set[str] = set()
TEXT_ROOTS = ("roles", "ansible_collections", "policy", "lab", ".ci")


def _python_files() -> list[Path]:
    out: list[Path] = []
    for root in PYTHON_ROOTS:
        p = REPO / root
        out += [p] if p.is_file() else sorted(p.rglob("*.py"))
    return [
        p
        for p in out
        if "/data/" not in str(p.relative_to(REPO))
        and "__pycache__" not in p.parts
        and not p.is_symlink()
    ]


def _literals(tree: ast.AST) -> list[str]:
    """String constants that are not docstrings (f-string parts included)."""
    docs = {
        id(n.body[0].value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and n.body
        and isinstance(n.body[0], ast.Expr)
        and isinstance(n.body[0].value, ast.Constant)
    }
    return [
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs
    ]


def python_spellings() -> dict[str, list[str]]:
    """{file: host paths its code spells out}, paths.py and the guest scripts left out."""
    found: dict[str, list[str]] = {}
    for p in _python_files():
        rel = str(p.relative_to(REPO))
        if rel == "src/ipvs_fleet/paths.py" or rel in GUEST_SCRIPTS:
            continue
        hits = [m for s in _literals(ast.parse(p.read_text())) for m in HOST_PATH.findall(s)]
        if hits:
            found[rel] = hits
    return found


def divergent(text: str) -> list[str]:
    """The host paths in `text` that are not ipvs_fleet.paths' values or below them."""
    bad = []
    for m in HOST_PATH.findall(text):
        m = m.rstrip("./")
        if m not in VALUES and not m.startswith(PREFIXES):
            bad.append(m)
    return bad


def test_python_imports_the_host_paths() -> None:
    found = python_spellings()
    assert {f: v for f, v in found.items() if f not in PENDING} == {}
    assert sorted(PENDING - set(found)) == []  # landed: take it off PENDING


def test_role_and_policy_spell_the_same_paths() -> None:
    files = [
        p
        for root in TEXT_ROOTS
        for p in sorted((REPO / root).rglob("*"))
        if p.is_file() and p.suffix != ".py" and "__pycache__" not in p.parts
    ]
    assert any("roles/ipvs_fleet/templates" in str(p) for p in files)
    bad = {str(p.relative_to(REPO)): b for p in files if (b := divergent(p.read_text()))}
    assert bad == {}


def test_a_divergent_copy_is_caught() -> None:
    assert divergent("sysctl -p /etc/sysctl.d/90-ipvs-fleet.conf; rm /var/lib/ipvs-fleet/x") == []
    assert divergent("-p /etc/sysctl.d/80-ipvs-fleet.conf") == ["/etc/sysctl.d/80-ipvs-fleet.conf"]
    assert divergent("mkdir -p /var/lib/ipvs-fleets") == ["/var/lib/ipvs-fleets"]
    assert divergent("x /run/ipvs-fleet-chek/probe.py") == ["/run/ipvs-fleet-chek/probe.py"]
