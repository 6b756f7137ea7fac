"""The upstream series (`src/ipvs_fleet/kernel/upstream/`, issue 18) as files: well-formed
`git format-patch` output with a cover letter, numbered subjects, a placeholder-free From:,
no sign-off (the submitter adds it), the Documentation entry, the selftest and its Makefile
hook. Hermetic: whether it applies to 7.2 and passes checkpatch is the lab test's job
(tests/builds/test_upstream_checkpatch.py)."""

from __future__ import annotations

import re
from email import message_from_string
from email.message import Message
from pathlib import Path

from ipvs_fleet import kernel

UPSTREAM = Path(kernel.__file__).parent / "upstream"
FROM = "ipvs-fleet maintainers <maintainers@users.noreply.example>"


def series_files() -> list[Path]:
    return sorted(UPSTREAM.glob("*.patch"))


def headers(path: Path) -> Message:
    """The mail headers of one format-patch file (the mbox 'From <sha>' line skipped)."""
    text = path.read_text()
    first, _, rest = text.partition("\n")
    assert re.fullmatch(r"From [0-9a-f]{40} Mon Sep 17 00:00:00 2001", first), path.name
    return message_from_string(rest.split("\n\n", 1)[0] + "\n\n")


def body(path: Path) -> str:
    """Commit message of a patch: after the headers, up to the `---` separator."""
    text = path.read_text()
    return text.split("\n\n", 1)[1].split("\n---\n", 1)[0]


def diff(path: Path) -> str:
    return path.read_text().split("\n---\n", 1)[1]


def test_series_is_a_cover_letter_and_numbered_patches() -> None:
    files = series_files()
    assert files, f"no series in {UPSTREAM}"
    assert files[0].name == "0000-cover-letter.patch"
    n = len(files) - 1
    assert n >= 2
    for i, f in enumerate(files):
        assert f.name.startswith(f"{i:04d}-"), f.name
        subject = " ".join(str(headers(f)["Subject"]).split())
        assert subject.startswith(f"[PATCH {i}/{n}] "), (f.name, subject)


def test_every_file_is_from_the_project_with_no_sign_off_or_placeholder() -> None:
    for f in series_files():
        h = headers(f)
        assert h["From"] == FROM, f.name
        assert h["Date"], f.name
        text = f.read_text()
        assert "Signed-off-by:" not in text, f.name
        assert "*** SUBJECT HERE ***" not in text and "*** BLURB HERE ***" not in text
        # placeholders in the prose a reviewer reads (the code may name its arguments)
        prose = str(h) + body(f)
        assert not re.search(r"<(your|name|email)[^>]*>|TODO|FIXME|XXX", prose), f.name


def test_cover_letter_argues_the_design_and_carries_the_diffstat() -> None:
    cover = series_files()[0]
    text = cover.read_text()
    subject = " ".join(str(headers(cover)["Subject"]).split())
    assert subject.startswith("[PATCH 0/") and "ipvs" in subject
    for point in ("conn_reuse_mode", "sysctl", "re-track", "Fixes:", "f0a5e4d7a594", "2020"):
        assert point in text, point
    # git's shortlog and diffstat of the whole series
    assert re.search(r"^ \d+ files changed, \d+ insertions\(\+\)", text, re.M)
    for f in series_files()[1:]:
        title = " ".join(str(headers(f)["Subject"]).split()).split("] ", 1)[1]
        assert f"  {title}" in text, title


def test_kernel_patch_explains_problem_objection_design_and_measurements() -> None:
    ipvs = next(f for f in series_files()[1:] if "ipvs:" in str(headers(f)["Subject"]))
    msg = body(ipvs)
    assert 'commit f719e3754ee2 ("ipvs: drop first packet to redirect' in msg
    assert 'f0a5e4d7a594 ("ipvs: allow connection reuse for unconfirmed' in msg
    assert "inconsistent" in msg and "2020" in msg  # the review of the seed
    assert "netif_rx()" in msg and "ip_local_out()" in msg  # the design
    assert "Fixes:" not in msg.replace("no Fixes: tag", "")  # opt-in, not a fix
    # the measured table: every line, stock vs the bit, slow/failed
    assert re.search(r"5\.10\s+6\.1\s+6\.12", msg)
    assert len(re.findall(r"^  \S+/\S+ +(outside|pod|host) +v[46] ", msg, re.M)) >= 10
    assert all(len(line) <= 75 for line in msg.splitlines()), "commit message wider than 75"


def test_series_touches_the_code_the_documentation_and_the_selftest() -> None:
    touched = {
        m for f in series_files()[1:] for m in re.findall(r"^diff --git a/(\S+) ", diff(f), re.M)
    }
    assert {
        "net/netfilter/ipvs/ip_vs_core.c",
        "Documentation/networking/ipvs-sysctl.rst",
        "tools/testing/selftests/net/netfilter/ipvs_conn_reuse.sh",
        "tools/testing/selftests/net/netfilter/Makefile",
    } <= touched
    docs = "".join(diff(f) for f in series_files()[1:])
    assert re.search(r"^\+\tbit 3 \(value 4\):", docs, re.M)
    assert re.search(r"^\+\tipvs_conn_reuse\.sh \\$", docs, re.M)


def test_kernel_code_keeps_the_stock_drop_as_the_default() -> None:
    text = "".join(diff(f) for f in series_files()[1:])
    added = "\n".join(ln[1:] for ln in text.splitlines() if ln.startswith("+"))
    assert "sysctl_conn_reuse_mode(ipvs) & 4" in added
    assert added.count("return ip_vs_reinject(ipvs, skb, hooknum, af);") == 2
    assert "nf_ct_kill(ct);" in added and "nf_conntrack_in(" not in added
    assert "IPS_DST_NAT_DONE" not in added


def stat(text: str) -> tuple[dict[str, int], int]:
    """{path: lines changed} and the insertions total of a diffstat in `text`."""
    files = {m[1]: int(m[2]) for m in re.finditer(r"^ (\S+)\s+\|\s+(\d+) [+-]*$", text, re.M)}
    total = re.search(r"^ \d+ files? changed, (\d+) insertions?\(\+\)", text, re.M)
    assert total, "no diffstat"
    return files, int(total[1])


def test_cover_letter_diffstat_is_the_patches_own() -> None:
    """A patch regenerated after the cover letter (0002 after the selftest's fix) must not
    leave the cover letter's diffstat behind."""
    cover, *patches = series_files()
    files: dict[str, int] = {}
    total = 0
    for p in patches:
        f, t = stat(p.read_text().split("\n---\n", 1)[1].split("\ndiff --git ", 1)[0])
        files.update(f)
        total += t
    assert stat(cover.read_text()) == (files, total)
