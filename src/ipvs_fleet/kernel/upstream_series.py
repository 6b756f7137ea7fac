"""The upstream series, ready to send: `git format-patch` output of the series in
`kernel/upstream/` applied to a kernel tree, its From: and Signed-off-by: the submitter's.

A Signed-off-by: certifies the Developer's Certificate of Origin, which only the person who
sends the series can do. So the stored series carries no author, date or sign-off, and both
come from `git config user.name` / `user.email` when the series is generated; generation
refuses when either is unset or is a placeholder (a reserved domain such as .example or
.invalid, or a no-reply address: reviewers answer to the From:).

Stored form (`kernel/upstream/`, file names as `git format-patch` gives them): a patch is
`Subject: <title>`, a blank line, the commit message, `---`, a diffstat and the diff; the
cover letter (`0000-cover-letter.patch`) is `Subject: <title>`, a blank line and the blurb
(the shortlog and diffstat are git's at generation). `import_series` makes that form from
format-patch output.

    python -m ipvs_fleet.kernel.upstream_series --tree ~/src/nf-next --out out/
    python -m ipvs_fleet.kernel.upstream_series --import /tmp/fp  # after editing the series
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from email import message_from_string, policy
from email.utils import parseaddr
from pathlib import Path
from typing import Any

from ipvs_fleet import kernel
from ipvs_fleet.errors import ConfigError, FleetError

COVER = "0000-cover-letter.patch"
SUBJECT_PREFIX = "PATCH nf-next"
# Top-level domains that never deliver mail (RFC 2606, RFC 6761) and the reserved
# second-level example domains.
RESERVED_TLDS = {"example", "invalid", "localhost", "test", "local"}
RESERVED_DOMAINS = {"example.com", "example.net", "example.org"}


@dataclass(frozen=True)
class Identity:
    """Who sends the series: From: and Signed-off-by:."""

    name: str
    email: str

    def __str__(self) -> str:
        return f"{self.name} <{self.email}>"


@dataclass(frozen=True)
class Patch:
    """One patch of the stored series."""

    name: str  # file name, 0001-....patch
    title: str  # subject without the [PATCH n/m] prefix
    message: str  # commit message body (after the subject)
    diff: str  # from the first `diff --git`


def placeholder(who: Identity) -> str | None:
    """Why `who` cannot sign a kernel submission, or None."""
    domain = who.email.rpartition("@")[2].lower()
    if "@" not in who.email or "." not in domain:
        return f"{who.email!r} is not a mail address"
    if domain.rsplit(".", 1)[1] in RESERVED_TLDS or any(
        domain == d or domain.endswith("." + d) for d in RESERVED_DOMAINS
    ):
        return f"{who.email!r} is in a reserved domain that receives no mail"
    if re.search(r"no-?reply", who.email, re.I):
        return f"{who.email!r} is a no-reply address"
    if who.name.strip().lower() in {"your name", "name", "user", "root"}:
        return f"{who.name!r} is not a name"
    return None


def git_identity(cwd: Path | None = None) -> Identity:
    """The submitter: `git config user.name` and `user.email` as git sees them in `cwd`.
    ConfigError if either is unset or the identity is a placeholder."""
    values = []
    for key in ("user.name", "user.email"):
        r = subprocess.run(
            ["git", "config", "--get", key], cwd=cwd, capture_output=True, text=True, timeout=60
        )
        values.append(r.stdout.strip())
    if not all(values):
        raise ConfigError(
            "the series' From: and Signed-off-by: are the submitter's git identity, and "
            "git config user.name / user.email are unset: git config --global user.name "
            "'Your Name'; git config --global user.email you@your.domain"
        )
    who = Identity(*values)
    why = placeholder(who)
    if why:
        raise ConfigError(f"git identity {who} cannot sign the series: {why}")
    return who


def _subject(text: str, path: Path) -> tuple[str, str]:
    """(title, rest) of a stored file: its `Subject:` header (folded lines joined)."""
    head, sep, rest = text.partition("\n\n")
    m = re.fullmatch(r"Subject: (.+(?:\n[ \t].+)*)", head)
    if not sep or not m:
        raise ConfigError(f"{path}: not a stored series file (Subject: line, blank line)")
    return " ".join(m[1].split()), rest


def read_series(series: Path = kernel.UPSTREAM) -> tuple[str, str, list[Patch]]:
    """(cover title, cover blurb, patches) of a stored series."""
    cover = series / COVER
    if not cover.is_file():
        raise ConfigError(f"{series}: no {COVER}")
    title, blurb = _subject(cover.read_text(), cover)
    patches = []
    for p in sorted(series.glob("[0-9][0-9][0-9][0-9]-*.patch")):
        if p.name == COVER:
            continue
        ptitle, rest = _subject(p.read_text(), p)
        message, sep, tail = rest.partition("\n---\n")
        at = tail.find("diff --git ")
        if not sep or at < 0:
            raise ConfigError(f"{p}: no `---` and diff after the commit message")
        patches.append(Patch(p.name, ptitle, message.strip("\n"), tail[at:]))
    if not patches:
        raise ConfigError(f"{series}: no patches")
    return title, blurb.strip("\n"), patches


def _touched(patches: list[Patch]) -> list[str]:
    """Files the patches change that exist before them (new files excluded)."""
    files: set[str] = set()
    new: set[str] = set()
    for p in patches:
        for m in re.finditer(r"^diff --git a/(\S+) b/\S+\n(new file mode)?", p.diff, re.M):
            (new if m[2] else files).add(m[1])
    return sorted(files - new)


def _git(repo: Path, who: Identity, *args: str, stdin: str | None = None) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": who.name,
        "GIT_AUTHOR_EMAIL": who.email,
        "GIT_COMMITTER_NAME": who.name,
        "GIT_COMMITTER_EMAIL": who.email,
    }
    # the scratch repository's commits: no signing, hooks or format.signOff of the user's
    conf = [
        f"user.name={who.name}",
        f"user.email={who.email}",
        "commit.gpgSign=false",
        "core.hooksPath=/dev/null",
        "format.signOff=false",
    ]
    r = subprocess.run(
        ["git", *(a for c in conf for a in ("-c", c)), *args],
        cwd=repo,
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    if r.returncode != 0:
        raise FleetError(f"git {args[0]}: {(r.stderr or r.stdout).strip()}")
    return r.stdout


def generate(
    tree: Path,
    out: Path,
    *,
    who: Identity | None = None,
    series: Path = kernel.UPSTREAM,
    subject_prefix: str = SUBJECT_PREFIX,
) -> list[Path]:
    """Write the series as `git format-patch --cover-letter` output into `out`: the stored
    patches applied in order to the files they change, copied from the kernel source `tree`
    (a git checkout or an unpacked linux-source), each committed by `who` with its
    Signed-off-by:. The files written, cover letter first.

    + who: the submitter; default `git_identity()` (tests pass one)
    + subject_prefix: `[PATCH nf-next n/m]` by default; e.g. "RFC PATCH nf-next"
    """
    who = who or git_identity()
    title, blurb, patches = read_series(series)
    with tempfile.TemporaryDirectory(prefix="upstream-series-") as tmp:
        repo = Path(tmp)
        for rel in _touched(patches):
            src = tree / rel
            if not src.is_file():
                raise ConfigError(f"{tree}: no {rel}, which the series changes")
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, repo / rel)
        _git(repo, who, "init", "-q")
        _git(repo, who, "add", "-A")
        _git(repo, who, "commit", "-q", "--allow-empty", "-m", "base")
        for p in patches:
            try:
                _git(repo, who, "apply", "--index", "-", stdin=p.diff)
            except FleetError as e:
                raise FleetError(f"{p.name} does not apply to {tree}: {e}") from e
            _git(
                repo,
                who,
                "commit",
                "-q",
                "-s",
                "--cleanup=whitespace",
                "-F",
                "-",
                stdin=f"{p.title}\n\n{p.message}\n",
            )
        out.mkdir(parents=True, exist_ok=True)
        names = _git(
            repo,
            who,
            "format-patch",
            "--cover-letter",
            f"--subject-prefix={subject_prefix}",
            "-o",
            str(out.resolve()),
            f"HEAD~{len(patches)}",
        ).split()
    files = [Path(n) for n in names]
    cover = files[0]
    text = cover.read_text()
    # git's template: the Subject: (maybe folded) ends in the placeholder, then the blurb's
    subject = re.search(r"^Subject: .*(?:\n .*)*", text, re.M)
    line = " ".join(subject[0].split()) if subject else ""
    template = line.endswith(" *** SUBJECT HERE ***") and "\n*** BLURB HERE ***\n" in text
    if subject is None or not template:
        raise FleetError(f"{cover}: git's cover letter template changed")
    text = text.replace(subject[0], fold(line.replace("*** SUBJECT HERE ***", title)))
    cover.write_text(text.replace("\n*** BLURB HERE ***\n", f"\n{blurb}\n"))
    check_generated(files, who)
    return files


def mail_from(text: str) -> Identity:
    """The From: of a format-patch file, decoded (git encodes non-ASCII names)."""
    header = text.split("\n", 1)[1].split("\n\n", 1)[0]
    name, email = parseaddr(
        str(message_from_string(header + "\n\n", policy=policy.default)["From"] or "")
    )
    return Identity(name, email)


def fold(header: str, width: int = 78) -> str:
    """A mail header line folded at spaces into lines of at most `width`, as git does."""
    lines = [""]
    for word in header.split(" "):
        if lines[-1] and len(lines[-1]) + 1 + len(word) > width:
            lines.append("")
        lines[-1] = f"{lines[-1]} {word}" if lines[-1] else word
    return "\n ".join(lines)


def check_generated(files: list[Path], who: Identity) -> None:
    """FleetError unless every file is from `who` and every patch signed off by `who` once."""
    for f in files:
        text = f.read_text()
        if mail_from(text) != who:
            raise FleetError(f"{f}: From: is {mail_from(text)}, not {who}")
        if f.name != files[0].name and text.count(f"\nSigned-off-by: {who}\n") != 1:
            raise FleetError(f"{f}: not signed off by {who} exactly once")
        if "*** SUBJECT HERE ***" in text or "*** BLURB HERE ***" in text:
            raise FleetError(f"{f}: placeholder left")


def _strip_mail(text: str, path: Path) -> tuple[str, str]:
    """(title without [PATCH ..] prefix, body) of a format-patch file, mail headers and
    git's signature dropped, and the sender's own Signed-off-by:."""
    head, sep, body = text.partition("\n\n")
    m = re.search(r"^Subject: (.+(?:\n[ \t].+)*)", head, re.M)
    if not sep or not m:
        raise ConfigError(f"{path}: not git format-patch output (no Subject:)")
    title = re.sub(r"^\[[^]]*\]\s*", "", " ".join(m[1].split()))
    body = re.sub(r"\n-- \n[^\n]*\n*\Z", "\n", body)
    msg, sep, rest = body.partition("\n---\n")
    msg = msg.replace(f"Signed-off-by: {mail_from(text)}\n", "")
    return title, msg.rstrip("\n") + "\n" + sep + rest


def import_series(src: Path, series: Path = kernel.UPSTREAM) -> list[Path]:
    """Replace the stored series by `git format-patch --cover-letter` output in `src`,
    without its authors, dates and sign-offs (the cover letter: subject and blurb only)."""
    files = sorted(src.glob("[0-9][0-9][0-9][0-9]-*.patch"))
    if not files or files[0].name != COVER:
        raise ConfigError(f"{src}: no format-patch output with a {COVER}")
    stored: dict[str, str] = {}
    for f in files:
        title, body = _strip_mail(f.read_text(), f)
        if f.name == COVER:
            # the blurb ends where git's shortlog ("Name (n):") begins
            blurb = re.split(r"\n\n[^\n]+ \(\d+\):\n", "\n" + body, maxsplit=1)[0]
            stored[f.name] = f"Subject: {title}\n\n{blurb.strip()}\n"
        else:
            stored[f.name] = f"Subject: {title}\n\n{body}"
    for old in series.glob("*.patch"):
        old.unlink()
    for name, text in stored.items():
        (series / name).write_text(text)
    read_series(series)  # the result reads back
    return [series / n for n in stored]


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "upstream-series",
        help="the upstream series as mail, From: and Signed-off-by: your git identity",
        description=(
            "The upstream series (kernel/upstream/ of the package) applied to a kernel tree and "
            "written as git format-patch mail with a cover letter. From: and Signed-off-by: "
            "are the submitter's git identity (git config user.name and user.email); "
            "generation refuses when they are unset or a placeholder. --import DIR stores "
            "format-patch output back in the stored form."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--tree", type=Path, help="kernel source to apply the series to (e.g. an nf-next checkout)"
    )
    p.add_argument("--out", type=Path, help="folder for the mails (git format-patch -o)")
    p.add_argument(
        "--subject-prefix",
        default=SUBJECT_PREFIX,
        help=f"default {SUBJECT_PREFIX!r}; e.g. 'RFC PATCH nf-next'",
    )
    p.add_argument(
        "--import",
        dest="import_dir",
        type=Path,
        metavar="DIR",
        help="store format-patch output of DIR as the series instead "
        "(authors, dates and sign-offs dropped)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.import_dir:
        for f in import_series(args.import_dir):
            print(f)
        return 0
    if not args.tree or not args.out:
        raise ConfigError("name the kernel tree and the output folder: --tree DIR --out DIR")
    for f in generate(args.tree, args.out, subject_prefix=args.subject_prefix):
        print(f)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ipvs_fleet.kernel.upstream_series")
    sub = p.add_subparsers(dest="command")
    add_parser(sub)
    args = p.parse_args(["upstream-series", *(argv if argv is not None else sys.argv[1:])])
    try:
        return int(args.func(args))
    except FleetError as e:
        print(f"upstream-series: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
