"""Every shell command that changes a host, written once for both engines.

The pyinfra operations (`operations.py`) read facts, compare, and yield these texts; the
Ansible role runs the same texts through its one filter (`ipvs_fleet_command`), deciding
nothing itself. Each command that changes the IPVS state takes the host lock (`locked`).
Plain text: pyinfra wraps it in sudo, Ansible in become.
"""

from __future__ import annotations

import posixpath
import secrets
from collections.abc import Iterable, Mapping
from shlex import quote as q

from ipvs_fleet.paths import DKMS_NAME, DKMS_SOURCE_PREFIX, DKMS_TREE, LOCK, STATE_DIR

STAGING_DIR = f"{STATE_DIR}/staging"
# Run under the lock after a staged file is renamed: the folders of runs that died a day ago.
STALE_STAGING = f"find {STAGING_DIR} -mindepth 1 -maxdepth 1 -mmin +1440 -exec rm -rf {{}} +"

# renameat2(AT_FDCWD, $0, AT_FDCWD, $1, RENAME_EXCHANGE) through perl (perl-base is Essential on
# Debian; coreutils' `mv --exchange` is 9.5+, after bookworm). Arguments: two paths, `uname -m`.
EXCHANGE = (
    "perl -e 'my %nr = (x86_64 => 316, aarch64 => 276); my $n = $nr{$ARGV[2]} "
    'or die "no renameat2 number for $ARGV[2]\\n"; '
    'syscall($n, -100, $ARGV[0], -100, $ARGV[1], 2) == 0 or die "renameat2: $!\\n"\''
)


def backup_path(path: str) -> str:
    return f"{STATE_DIR}/backup{path}"


def staging_path(path: str, token: str) -> str:
    """Where run `token` uploads a managed file before it is renamed into place."""
    return f"{STAGING_DIR}/{token}{path}"


def lock_preamble(what: str, wait: int) -> str:
    """Take the host lock (flock on LOCK) and record `what` as its holder: a second
    controller waits up to `wait` s, then fails naming the holder."""
    wait = int(wait)
    return (
        f"mkdir -p {q(STATE_DIR)} && exec 9>> {q(LOCK)} && {{ flock -w {wait} 9 || "
        f"{{ echo 'the host lock {LOCK} stayed held for {wait} s by:' \"$(cat "
        f'{q(LOCK + ".holder")} 2>/dev/null)" >&2; exit 1; }}; }} && echo "ipvs-fleet '
        f'{what}, pid $$, since $(date -Is)" > {q(LOCK + ".holder")}'
    )


def locked(what: str, wait: int, script: str) -> str:
    """`script` run under the host lock."""
    return f"{lock_preamble(what, wait)} && {script}"


def fail(message: str) -> str:
    """Fail the host with `message` on stderr."""
    return f"printf '%s\\n' {q(message)} >&2; exit 1"


INCOMING = f"{STATE_DIR}/incoming"


def incoming(name: str) -> str:
    """Where one run uploads the archive `name` on a host: a name of its own (two controllers
    deploying a host at once each check and install their own upload; with one shared name
    the first one's install removed the file the second was about to check)."""
    return f"{INCOMING}/{name}.{secrets.token_hex(6)}"


def upload_dir(dest: str) -> str:
    """Before an upload to `dest`: STATE_DIR made (again) root's alone, dest's folder made;
    before an upload into INCOMING, uploads left there for over a day (a run killed before its
    install, or refused) go."""
    made = f"install -d -m 0700 {q(STATE_DIR)} && mkdir -p {q(posixpath.dirname(dest))}"
    if posixpath.dirname(dest) != INCOMING:
        return made
    return f"{made} && find {q(INCOMING)} -maxdepth 1 -type f -mtime +0 -delete"


def unchanged_or_refused(path: str, sha256: str, what: str, refusal: str) -> str:
    """Fail, removing `path`, unless it holds the bytes of `sha256`: run as root right before
    `path` is used (an upload through sudo passes the SSH user's hands)."""
    msg = (
        f"ipvs-fleet: {what}: the staged copy does not match the sha256 the controller "
        f"sent ({sha256}): {refusal}"
    )
    return (
        f"{{ echo {q(f'{sha256}  {path}')} | sha256sum -c --status || {{ echo {q(msg)} "
        f">&2; rm -f {q(path)} ; exit 1; }}; }}"
    )


def swap_in(staging: str, dest: str) -> str:
    """Put the directory `staging` at `dest` with no moment where `dest` is missing: an
    atomic exchange when `dest` exists, then the old set is removed; where the file system
    cannot exchange, two renames, said on stderr."""
    s, d = q(staging), q(dest)
    return (
        f'if [ -d {d} ]; then {{ {EXCHANGE} {s} {d} "$(uname -m)" || '
        f'{{ echo "ipvs-fleet: no atomic exchange here: two renames" >&2; '
        f"rm -rf {d}.old && mv {d} {d}.old && mv {s} {d} && mv {d}.old {s}; }}; }} "
        f"&& rm -rf {s}; else mv {s} {d}; fi"
    )


def vermagic_check(kernel_release: str) -> str:
    """Run in a staged module folder: fail naming both kernels unless every `.ko` there was
    built for `kernel_release`."""
    kr = q(kernel_release)
    return (
        'for f in *.ko; do v=$(modinfo -F vermagic "./$f") || exit 1; case "$v" in '
        f'{kr}" "*) ;; *) echo "ipvs-fleet: $f is built for kernel ${{v%% *}}, not "{kr}": '
        'nothing installed" >&2; exit 1;; esac; done'
    )


def install(
    dest: str,
    kernel_release: str,
    remote_tar: str,
    tarball_sha256: str,
    modules: Mapping[str, str],
    lock_wait: int,
) -> str:
    """Install the uploaded archive `remote_tar` as the module folder `dest`: the archive
    checked as root, then under the lock every module checked and the folder exchanged in,
    depmod. A controller that waited for the lock may find this build installed already."""
    sums = "\n".join(f"{sha}  {name}" for name, sha in sorted(modules.items()))
    n, staging, old = len(modules), f"{dest}.new", f"{dest}.old"
    refusal = (
        f"ipvs-fleet: {remote_tar} on the host does not match the sha256 the controller "
        f"checked ({tarball_sha256}): nothing installed"
    )
    check = (
        f"chmod 600 {q(remote_tar)} && echo {q(f'{tarball_sha256}  {remote_tar}')} | "
        f"sha256sum -c --quiet || {{ echo {q(refusal)} >&2; exit 1; }}"
    )
    same = (
        f"[ -d {q(dest)} ] && [ $(ls {q(dest)} | wc -l) -eq {n} ] && (cd {q(dest)} && "
        f"printf '%s\\n' {q(sums)} | sha256sum -c --quiet --strict) >/dev/null 2>&1"
    )
    swap = (
        f"rm -rf {q(staging)} && mkdir -p {q(staging)} && tar -xzf {q(remote_tar)} -C "
        f"{q(staging)} && cd {q(staging)} && printf '%s\\n' {q(sums)} | sha256sum -c --quiet "
        f"--strict && {{ {vermagic_check(kernel_release)} ; }} && [ $(ls {q(staging)} | wc -l) "
        f"-eq {n} ] && sync -f {q(staging)} && {{ {swap_in(staging, dest)} ; }} && rm -rf "
        f"{q(old)} {q(remote_tar)} && depmod {q(kernel_release)} && sync -f {q(dest)}"
    )
    return (
        check
        + "\n"
        + locked(
            "install",
            lock_wait,
            f"if {same} ; then rm -f {q(remote_tar)} && depmod {q(kernel_release)} ; "
            f"else {swap} ; fi",
        )
    )


def dkms_install(script: str, script_sha256: str, args: Iterable[str], count: int) -> str:
    """Run the uploaded DKMS host script (checked first), removing it whatever its result."""
    words = " ".join(q(a) for a in args)
    return (
        f"{unchanged_or_refused(script, script_sha256, script, 'not run')} && sh {q(script)} "
        f"{words} {count} ; rc=$?; rm -f {q(script)} ; exit $rc"
    )


def remove_modules(dest: str, kernel_release: str, dkms: Iterable[str], lock_wait: int) -> str:
    """Remove the fix module's folder (and any DKMS registration), depmod."""
    out = [
        f"dkms remove -m {DKMS_NAME} -v {q(v)} --all >/dev/null 2>&1; rm -rf "
        f"{q(f'{DKMS_TREE}/{v}')} {q(f'{DKMS_SOURCE_PREFIX}{v}')}"
        for v in dkms
    ]
    out.append(locked("remove", lock_wait, f"rm -rf {q(dest)} && depmod {q(kernel_release)}"))
    return "\n".join(out)


def write_file(
    path: str,
    lock_wait: int,
    backup: bool,
    staged: str = "",
    sha256: str = "",
    run_dir: str = "",
) -> str:
    """Under the lock: keep a one-time backup of `path` (or note it was absent) when `backup`,
    and, when `staged` (this run's uploaded copy, in `run_dir`) is given, check it against
    `sha256` and rename it into place, removing the run's folder and stale ones."""
    b = backup_path(path)
    steps = ["true"]
    if backup:
        steps = [
            f"mkdir -p {q(posixpath.dirname(b))} && {{ if [ -f {q(path)} ]; then cp -p "
            f"{q(path)} {q(b)} ; else touch {q(b + '.absent')} ; fi; }}"
        ]
    if staged:
        steps = [
            unchanged_or_refused(staged, sha256, path, "not installed"),
            *steps,
            f"chmod 644 {q(staged)} && mv -f {q(staged)} {q(path)} && rm -rf {q(run_dir)}",
            STALE_STAGING,
        ]
    return locked("configure", lock_wait, " && ".join(steps))


def restore_file(path: str, backup: str, lock_wait: int) -> str:
    """Put back the copy kept of `path` (`backup` "file") or remove the file the deploy
    created (`backup` "absent")."""
    b = backup_path(path)
    if backup == "file":
        return locked("restore", lock_wait, f"cp -p {q(b)} {q(path)} && rm -f {q(b)}")
    return locked("restore", lock_wait, f"rm -f {q(path)} {q(b + '.absent')}")


def load_modules(modules: Iterable[str], lock_wait: int, unload: str = "") -> str:
    """Under the lock: `rmmod unload` (the fix module of another build, or the rollback's),
    then modprobe each of `modules`. IPVS itself is never unloaded."""
    steps = ["true"]
    if unload:
        steps.append(f"rmmod {q(unload)}")
    mods = " ".join(q(m) for m in modules)
    if mods:
        steps.append(f'for m in {mods} ; do modprobe "$m" || exit 1; done')
    return locked("activate", lock_wait, " && ".join(steps))


def hook(what: str, n: int, command: str, timeout: int) -> str:
    """Drain hook `n` bounded by `timeout`; failing, it fails the host naming itself."""
    return (
        f"timeout {int(timeout)} sh -c {q(command)} || {{ rc=$?; echo '{what} hook {n} "
        f"failed (exit '$rc'; 124: timed out after {int(timeout)} s):' >&2; printf '%s\\n' "
        f"{q(command)} >&2; exit 1; }}"
    )


def set_sysctl(key: str, value: int, lock_wait: int) -> str:
    """net.ipv4.vs.`key` = `value` in the running kernel, under the lock."""
    return locked("configure", lock_wait, f"sysctl -w {q(f'net.ipv4.vs.{key}={int(value)}')}")


# What the Ansible role may run, by name (its filter `ipvs_fleet_command`).
COMMANDS = {
    f.__name__: f
    for f in (
        install,
        remove_modules,
        write_file,
        restore_file,
        load_modules,
        hook,
        set_sysctl,
        upload_dir,
        staging_path,
    )
}
