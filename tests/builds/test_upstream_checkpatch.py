"""The upstream series (`src/ipvs_fleet/kernel/upstream/`) against the newest Debian kernel
source: `linux-source-<line>` from Debian unstable (7.2 when this was written), fetched from
the archive (the signed Packages index, the .deb's sha256), unpacked without installing.
The stored series must apply with `patch -p1` (as the `upstream` build variant applies it),
and the mail the generator makes of it on that tree (`kernel/upstream_series.py`: git
format-patch, From: and Signed-off-by: a submitter) must pass `scripts/checkpatch.pl --strict`
of that tree with nothing to report but, for a patch that adds a file, its MAINTAINERS
question, which get_maintainer answers (the folder is covered).

Network, ~200 MB download (cached) and ~1.5 GB of disk in a temporary folder: marked `lab`
and `build` like the module builds; `pytest -m build tests/builds/test_upstream_checkpatch.py`.
Commit ids cited in the messages cannot be checked here: without git history checkpatch
reports each as "Unknown commit id". Those warnings are accepted for exactly the ids listed in
VERIFIED_IDS (verified against the upstream commit texts, docs/upstream.md), no other."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ipvs_fleet import kernel
from ipvs_fleet.debian import CACHE, MIRROR, _fetch, _packages, _stanzas
from ipvs_fleet.kernel.upstream_series import Identity, generate, mail_from

pytestmark = [pytest.mark.lab, pytest.mark.build]

UPSTREAM = kernel.UPSTREAM
SUITE = "sid"
SERIES_LINE = kernel.UPSTREAM_LINE  # the kernel line the series applies to (its cover letter)
# Who sends it here (the generator takes the real submitter's from git config).
SUBMITTER = Identity("Jane Submitter", "jane@submitter.dev")
MAINTAINERS_QUESTION = "WARNING: added, moved or deleted file(s), does MAINTAINERS need updating?"
# f719e3754ee2 "ipvs: drop first packet to redirect conntrack" (2016, the drop),
# f0a5e4d7a594 "ipvs: allow connection reuse for unconfirmed conntrack" (5.9, the narrowing)
VERIFIED_IDS = ("f719e3754ee2", "f0a5e4d7a594")


def series_source() -> tuple[str, str, dict[str, str]]:
    """(line, version, Packages stanza) of linux-source-<SERIES_LINE> in unstable: the line
    the series was made against, so that a newer line in unstable fails by name here (port
    the series, then move SERIES_LINE) rather than as patch rejects."""
    found = _stanzas(_packages(MIRROR, SUITE, "amd64"), re.compile(r"linux-source-\d+\.\d+"))
    lines = sorted(st["Package"].rsplit("-", 1)[1] for st in found)
    mine = [st for st in found if st["Package"] == f"linux-source-{SERIES_LINE}"]
    assert mine, f"no linux-source-{SERIES_LINE} in {SUITE} any more (it has: {lines})"
    return SERIES_LINE, mine[0]["Version"], mine[0]


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    line, version, st = series_source()
    deb = CACHE / "upstream" / Path(st["Filename"]).name
    if not deb.is_file() or hashlib.sha256(deb.read_bytes()).hexdigest() != st["SHA256"]:
        data = _fetch(f"{MIRROR}/{st['Filename']}")
        assert hashlib.sha256(data).hexdigest() == st["SHA256"], "download does not match index"
        deb.parent.mkdir(parents=True, exist_ok=True)
        deb.write_bytes(data)
    work = tmp_path_factory.mktemp(f"linux-source-{line}")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(work / "deb")], check=True, timeout=600)
    tarball = work / "deb/usr/src" / f"linux-source-{line}.tar.xz"
    tree = work / "linux"
    tree.mkdir()
    subprocess.run(
        ["tar", "-xJf", str(tarball), "-C", str(tree), "--strip-components=1"],
        check=True,
        timeout=1200,
    )
    shutil.rmtree(work / "deb")
    print(f"linux-source-{line} {version} from {SUITE}")
    return tree


def checkpatch(tree: Path, patch: Path) -> list[str]:
    r = subprocess.run(
        ["perl", "scripts/checkpatch.pl", "--strict", "--no-color", str(patch)],
        cwd=tree,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return [ln for ln in r.stdout.splitlines() if re.match(r"(ERROR|WARNING|CHECK):", ln)]


@pytest.fixture(scope="module")
def mails(source_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The series as the generator writes it for sending, from the pristine tree."""
    files = generate(source_tree, tmp_path_factory.mktemp("mail"), who=SUBMITTER)
    assert [f.name for f in files] == sorted(p.name for p in UPSTREAM.glob("0*.patch"))
    return files


def test_generated_series_passes_checkpatch_strict(mails: list[Path], source_tree: Path) -> None:
    patches = mails[1:]  # the cover letter is not a patch
    assert patches
    for p in patches:
        text = p.read_text()
        assert mail_from(text) == SUBMITTER and f"\nSigned-off-by: {SUBMITTER}\n" in text
        adds_file = "\nnew file mode " in text
        flat = " ".join(text.replace("Commit ", "commit ").split())
        cited = [i for i in VERIFIED_IDS if f"commit {i} (" in flat]
        expected = [
            *(f"WARNING: Unknown commit id '{i}', maybe rebased or not pulled?" for i in cited),
            *([MAINTAINERS_QUESTION] if adds_file else []),
        ]
        assert checkpatch(source_tree, p) == expected, p.name
        if adds_file:
            # The question's answer: the new file's folder is already maintained.
            r = subprocess.run(
                ["perl", "scripts/get_maintainer.pl", "--no-git", "--no-git-fallback", str(p)],
                cwd=source_tree,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert "(maintainer:NETFILTER)" in r.stdout, (p.name, r.stdout, r.stderr)


def test_series_applies_to_the_pristine_tree(source_tree: Path, mails: list[Path]) -> None:
    # `mails` first: the generator needs the tree before this test patches it.
    for p in sorted(UPSTREAM.glob("0*.patch"))[1:]:
        r = subprocess.run(
            ["patch", "-p1", "--batch", "--forward", "--dry-run", "-i", str(p)],
            cwd=source_tree,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, (p.name, r.stdout[-2000:])
        subprocess.run(
            ["patch", "-p1", "--batch", "--forward", "-s", "-i", str(p)],
            cwd=source_tree,
            check=True,
            timeout=300,
        )
    script = source_tree / "tools/testing/selftests/net/netfilter/ipvs_conn_reuse.sh"
    assert script.is_file()
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    if shutil.which("shellcheck"):
        r = subprocess.run(
            ["shellcheck", "-x", script.name],
            cwd=script.parent,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stdout
