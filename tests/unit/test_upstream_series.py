"""The upstream series (`src/ipvs_fleet/kernel/upstream/`, issues 18 and 30) as files, and the
generator that makes mail of it (`kernel/upstream_series.py`).

Stored: a cover letter and numbered patches with no author, date or sign-off (those are the
submitter's, at generation); the kernel patch kills the stale conntrack entry before conntrack
with exported conntrack calls only, keeps the drop as the default, bounds conn_reuse_mode;
the Documentation entry, the selftest and its Makefile hook. Generated: git format-patch
output whose From: and Signed-off-by: are `git config user.name/user.email`, refused when
unset or a placeholder. Hermetic (a synthetic tree and series for the generator): whether
the real series applies to 7.2, passes checkpatch and its selftest is the job of
tests/builds/test_upstream_checkpatch.py and tests/lab/test_upstream_selftest.py."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ipvs_fleet import kernel
from ipvs_fleet.errors import ConfigError
from ipvs_fleet.kernel import upstream_series as us
from ipvs_fleet.kernel.upstream_series import COVER, Identity

UPSTREAM = kernel.UPSTREAM
SUBMITTER = Identity("Jane Submitter", "jane@submitter.dev")


def series_files() -> list[Path]:
    return sorted(UPSTREAM.glob("*.patch"))


def diff(path: Path) -> str:
    return path.read_text().split("\n---\n", 1)[1]


def added(paths: list[Path]) -> str:
    """The lines the patches add, without their `+`."""
    text = "".join(diff(p) for p in paths)
    return "\n".join(ln[1:] for ln in text.splitlines() if ln.startswith("+"))


def kernel_patch() -> us.Patch:
    return next(p for p in us.read_series()[2] if p.title.startswith("ipvs:"))


def test_series_is_a_cover_letter_and_numbered_patches() -> None:
    files = series_files()
    assert files, f"no series in {UPSTREAM}"
    assert files[0].name == COVER
    assert len(files) >= 3
    for i, f in enumerate(files):
        assert f.name.startswith(f"{i:04d}-"), f.name
    title, blurb, patches = us.read_series()
    assert title.startswith("ipvs: ") and blurb
    assert [p.name for p in patches] == [f.name for f in files[1:]]
    for p in patches:
        # git format-patch names a file after its subject: runs of other characters become
        # one "-", the ends are trimmed, then the name is cut to 52 characters (which may
        # end it in "-": 0002's does)
        slug = re.sub(r"[^A-Za-z0-9.]+", "-", p.title).strip("-.")[:52]
        assert p.name[5:].removesuffix(".patch") == slug, (p.name, p.title)


def test_stored_series_has_no_author_date_sign_off_or_placeholder() -> None:
    """Those are the submitter's, added when the series is generated (never stored)."""
    for f in series_files():
        text = f.read_text()
        assert text.startswith("Subject: ") and "[PATCH" not in text.split("\n", 1)[0]
        head = text.split("\n\n", 1)[0]
        assert not re.search(r"^(From|Date):", head, re.M), f.name
        assert not re.search(r"^From [0-9a-f]{40} ", text, re.M), f.name
        assert "Signed-off-by:" not in text, f.name
        assert "*** SUBJECT HERE ***" not in text and "*** BLURB HERE ***" not in text
        prose = text.split("\ndiff --git ", 1)[0]
        assert not re.search(r"<(your|name|email)[^>]*>|TODO|FIXME|XXX|@\S+\.example", prose)


def test_cover_letter_argues_the_design() -> None:
    text = (UPSTREAM / COVER).read_text()
    for point in (
        "conn_reuse_mode",
        "sysctl",
        "Re-tracking",
        "netif_rx()",
        "Fixes:",
        "f0a5e4d7a594",
        "2020",
        "NF_IP_PRI_CONNTRACK - 1",
        "exported",
    ):
        assert point in text, point
    assert all(len(ln) <= 75 for ln in text.splitlines()), "cover letter wider than 75"


def test_kernel_patch_explains_problem_objection_design_and_measurements() -> None:
    msg = kernel_patch().message
    flat = " ".join(msg.split())
    assert 'commit f719e3754ee2 ("ipvs: drop first packet to redirect conntrack")' in flat
    assert 'f0a5e4d7a594 ("ipvs: allow connection reuse for unconfirmed conntrack")' in flat
    assert "inconsistent" in msg and "2020" in msg  # the review of the seed
    assert "NF_IP_PRI_CONNTRACK - 1" in msg and "PRE_ROUTING" in msg  # the design
    assert "LOCAL_OUT" in msg and "Nothing is re-injected" in msg
    assert "Fixes:" not in msg.replace("no Fixes: tag", "")  # opt-in, not a fix
    # the measured table: every line, slow/failed of attempts
    assert re.search(r"5\.10\s+6\.1\s+6\.12", msg)
    assert len(re.findall(r"^  \S.*\d+/\d+ (of \d+|slow)\s", msg + "\n", re.M)) >= 5
    assert all(len(line) <= 75 for line in msg.splitlines()), "commit message wider than 75"


def test_series_touches_the_code_the_documentation_and_the_selftest() -> None:
    touched = {
        m for f in series_files()[1:] for m in re.findall(r"^diff --git a/(\S+) ", diff(f), re.M)
    }
    assert {
        "net/netfilter/ipvs/ip_vs_core.c",
        "net/netfilter/ipvs/ip_vs_ctl.c",
        "Documentation/networking/ipvs-sysctl.rst",
        "tools/testing/selftests/net/netfilter/ipvs_conn_reuse.sh",
        "tools/testing/selftests/net/netfilter/Makefile",
    } <= touched
    docs = "".join(diff(f) for f in series_files()[1:])
    assert re.search(r"^\+\tbit 3 \(value 4\):", docs, re.M)
    assert re.search(r"^\+\tValues with other bits set are rejected\.$", docs, re.M)
    assert re.search(r"^\+\tipvs_conn_reuse\.sh \\$", docs, re.M)


def test_kernel_code_kills_before_conntrack_and_keeps_the_drop_as_default() -> None:
    code = added(series_files()[1:2])
    # hooks on PRE_ROUTING and LOCAL_OUT, v4 and v6, right before conntrack
    for hook in ("NF_INET_PRE_ROUTING", "NF_INET_LOCAL_OUT"):
        for prio in ("NF_IP_PRI_CONNTRACK - 1", "NF_IP6_PRI_CONNTRACK - 1"):
            assert re.search(rf"\.hooknum\t= {hook},\n\t\t\.priority\t= {prio},", code), (
                hook,
                prio,
            )
    # registered only with bit 3 set (and IPVS's own hooks): off, stock behaviour
    assert "sysctl_conn_reuse_mode(ipvs) & IP_VS_CONN_REUSE_KILL_CT" in code
    assert "#define IP_VS_CONN_REUSE_KILL_CT\t4" in code
    # IPVS's own reschedule test and lookup
    for internal in (
        "is_new_conn_expected(cp, conn_reuse_mode)",
        "ip_vs_conn_in_get_proto",
        "sysctl_expire_nodest_conn(ipvs)",
        "IP_VS_DEST_CF_AVAILABLE",
    ):
        assert internal in code, internal
    # nothing re-injected or re-tracked; ip_vs_in_hook() itself unchanged
    for gone in ("nf_conntrack_in(", "netif_rx(", "ip_local_out(", "nf_reset_ct("):
        assert gone not in code, gone
    hunks = re.findall(r"^@@ [^@]+ @@ ?(.*)$", diff(series_files()[1]), re.M)
    assert not [h for h in hunks if "ip_vs_in_hook" in h]


def test_kernel_code_uses_only_exported_conntrack_calls() -> None:
    """No private conntrack core helper: every conntrack function the patch calls is
    exported (or a header inline over exported ones), as out-of-tree code could use it."""
    code = added(series_files()[1:2])
    calls = set(re.findall(r"\b((?:__)?nf_c(?:t|onntrack)\w*|nfct_\w+)\(", code))
    allowed = {
        "nf_conntrack_find_get",
        "nf_ct_kill",
        "nf_ct_put",
        "nf_ct_tuplehash_to_ctrack",
        "nf_ct_is_confirmed",
        "nfct_help",
    }
    assert calls and calls <= allowed, calls - allowed


def test_conn_reuse_mode_value_range_is_bounded() -> None:
    """The new bit comes with a mask check: values with undefined bits are refused, under
    a handler of its own (it registers the hooks) instead of plain proc_dointvec."""
    code = added(series_files()[1:2])
    assert "#define IP_VS_CONN_REUSE_MASK\t\t7" in code
    assert re.search(r"if \(val & ~IP_VS_CONN_REUSE_MASK\)\n\t+return -EINVAL;", code)
    assert ".proc_handler\t= proc_do_conn_reuse_mode," in code
    # the handler finds its netns in extra2, set at the table entry's own position
    entry = "\n+\ttbl[idx].extra2 = ipvs;\n \ttbl[idx++].data = &ipvs->sysctl_conn_reuse_mode;\n"
    assert entry in diff(series_files()[1])


# The generator, on a synthetic tree and series.


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t.dev", *args],
        cwd=cwd,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout


@pytest.fixture
def synthetic(tmp_path: Path) -> tuple[Path, Path]:
    """(tree, series): a two-file tree and a stored series of two patches against it."""
    tree = tmp_path / "tree"
    (tree / "net").mkdir(parents=True)
    (tree / "net/a.c").write_text("int a;\n")
    (tree / "Documentation").mkdir()
    (tree / "Documentation/a.rst").write_text("a\n")
    work = tmp_path / "work"
    shutil.copytree(tree, work)
    git(work, "init", "-q")
    git(work, "add", "-A")
    git(work, "commit", "-qm", "base")
    (work / "net/a.c").write_text("int a;\nint b;\n")
    (work / "Documentation/a.rst").write_text("a\nb\n")
    git(work, "commit", "-qam", "net: add b\n\nBecause b.")
    (work / "net/c.sh").write_text("#!/bin/sh\n")
    git(work, "add", "net/c.sh")
    git(work, "commit", "-qm", "selftests: add c\n\nA test of b.")
    fp = tmp_path / "fp"
    git(work, "format-patch", "-q", "--cover-letter", "-o", str(fp), "HEAD~2")
    cover = fp / COVER
    cover.write_text(
        cover.read_text()
        .replace("*** SUBJECT HERE ***", "net: b")
        .replace("*** BLURB HERE ***", "Why b.")
    )
    series = tmp_path / "series"
    series.mkdir()
    us.import_series(fp, series)
    return tree, series


def use_git_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, text: str) -> None:
    """Only this global git config, no system one, outside any repository."""
    cfg = tmp_path / "gitconfig"
    cfg.write_text(text)
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(cfg))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for var in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)


def test_import_keeps_subjects_messages_and_diffs_but_no_identity(
    synthetic: tuple[Path, Path],
) -> None:
    _, series = synthetic
    title, blurb, patches = us.read_series(series)
    assert (title, blurb) == ("net: b", "Why b.")
    assert [(p.title, p.message) for p in patches] == [
        ("net: add b", "Because b."),
        ("selftests: add c", "A test of b."),
    ]
    for f in series.glob("*.patch"):
        text = f.read_text()
        assert "t@t.dev" not in text and "Date:" not in text and "\n-- \n" not in text


def test_generated_series_is_from_and_signed_off_by_the_git_identity(
    synthetic: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree, series = synthetic
    use_git_config(
        monkeypatch, tmp_path, f"[user]\n\tname = {SUBMITTER.name}\n\temail = {SUBMITTER.email}\n"
    )
    files = us.generate(tree, tmp_path / "out", series=series)
    assert [f.name for f in files] == [COVER, *sorted(p.name for p in series.glob("00[0-9][1-9]*"))]
    for i, f in enumerate(files):
        text = f.read_text()
        assert re.match(r"From [0-9a-f]{40} Mon Sep 17 00:00:00 2001\n", text)
        assert us.mail_from(text) == SUBMITTER
        assert re.search(rf"^Subject: \[PATCH nf-next {i}/2\] ", text, re.M)
        assert text.count(f"Signed-off-by: {SUBMITTER}\n") == (1 if i else 0)
    cover = files[0].read_text()
    assert "Subject: [PATCH nf-next 0/2] net: b\n" in cover and "\nWhy b.\n" in cover
    assert f"\n{SUBMITTER.name} (2):\n  net: add b\n  selftests: add c\n" in cover
    assert " 3 files changed, 3 insertions(+)" in cover
    assert "create mode 100644 net/c.sh" in files[2].read_text()
    # the mail applies where the series came from, and the tree itself is untouched
    assert (tree / "net/a.c").read_text() == "int a;\n"


def test_generation_refuses_without_git_identity(
    synthetic: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree, series = synthetic
    use_git_config(monkeypatch, tmp_path, f"[user]\n\tname = {SUBMITTER.name}\n")
    with pytest.raises(ConfigError, match=r"user\.name / user\.email are unset"):
        us.generate(tree, tmp_path / "out", series=series)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("name", "email", "why"),
    [
        ("ipvs-fleet maintainers", "maintainers@users.noreply.example", "reserved domain"),
        ("A Person", "a@example.com", "reserved domain"),
        ("A Person", "a@host.invalid", "reserved domain"),
        ("A Person", "a@users.noreply.github.com", "no-reply"),
        ("Your Name", "you@your.dev", "not a name"),
        ("A Person", "a-person", "not a mail address"),
    ],
)
def test_generation_refuses_a_placeholder_identity(
    name: str, email: str, why: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_git_config(monkeypatch, tmp_path, f"[user]\n\tname = {name}\n\temail = {email}\n")
    with pytest.raises(ConfigError, match=why):
        us.git_identity()


def test_a_patch_that_does_not_apply_is_named(synthetic: tuple[Path, Path], tmp_path: Path) -> None:
    tree, series = synthetic
    (tree / "net/a.c").write_text("int z;\n")
    with pytest.raises(us.FleetError, match=r"0001-net-add-b\.patch does not apply"):
        us.generate(tree, tmp_path / "out", who=SUBMITTER, series=series)
