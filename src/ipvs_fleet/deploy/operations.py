"""pyinfra operations that converge a host's IPVS stack; each yields only what closes the gap.

Every operation here works the same under `pyinfra INV deploy.py` (a preview first: each
operation runs up to its first command against the host's current facts, changing nothing),
`--dry` and `-y`: facts are read, never trusted across operations (pyinfra 3 reads them
again when an operation executes), and nothing raises for a state that an earlier operation
of the same run will have changed by the time this one executes. In a preview each operation
that would change the host says what, as `[host] will ...` (in says.py's sentences, which the
Ansible role's check-mode report uses too); verification is a step of the execution, a
command that fails with the list of problems.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import secrets
from collections.abc import Generator, Iterable, Iterator, Mapping
from io import StringIO
from pathlib import Path
from typing import IO, Any

from pyinfra import host, logger
from pyinfra.api import FileUploadCommand, StringCommand, operation
from pyinfra.api.util import get_template
from pyinfra.facts.files import Directory
from pyinfra.operations import files, server

from ipvs_fleet.deploy import commands as cmd
from ipvs_fleet.deploy import says
from ipvs_fleet.deploy.commands import (
    EXCHANGE,
    STAGING_DIR,
    STALE_STAGING,
    STATE_DIR,
    backup_path,
    lock_preamble,
    swap_in,
    unchanged_or_refused,
    vermagic_check,
)
from ipvs_fleet.deploy.facts import (
    DkmsVersions,
    IpvsInstalledModules,
    IpvsInstalledSet,
    IpvsLoadedModules,
    IpvsSysctls,
    ManagedFile,
    updates_dir,
)
from ipvs_fleet.kernel import MODULE_NAME
from ipvs_fleet.paths import MODPROBE_FILE, MODULES_LOAD_FILE, SYSCTL_FILE
from ipvs_fleet.policy import KNOB, LOCK_WAIT_S, HostSettings
from ipvs_fleet.resources import host_script, templates_dir

# Re-exported: the commands' names as the deploy's callers know them.
__all__ = [
    "EXCHANGE",
    "MODPROBE_FILE",
    "MODULES_LOAD_FILE",
    "STALE_STAGING",
    "SYSCTL_FILE",
    "backup_path",
    "lock_preamble",
    "swap_in",
    "unchanged_or_refused",
    "vermagic_check",
]
TEMPLATES = templates_dir()
DKMS_SCRIPT = host_script("ipvs-dkms-install.sh")
# Files the deploy owns: target path -> template; each is backed up once before the first
# write so that rollback can put the previous one back (or remove ours).
MANAGED_FILES = {
    SYSCTL_FILE: "90-ipvs-fleet.conf.j2",
    MODULES_LOAD_FILE: "ipvs-fleet-modules.conf.j2",
    MODPROBE_FILE: "ipvs-fleet-modprobe.conf.j2",
}
# What a preview line starts with: `[host] will <what>` (ipvs_fleet.rollout reads them).
WILL = "will "


# One folder per controller run under STAGING_DIR: two controllers never upload to, read the
# facts of, or rename the same staged file.
RUN_TOKEN = f"{os.getpid()}-{secrets.token_hex(4)}"


def staging_path(path: str, token: str = RUN_TOKEN) -> str:
    """Where a managed file is uploaded before it is renamed into place under the host lock."""
    return cmd.staging_path(path, token)


def previewing() -> bool:
    """Whether pyinfra is detecting changes (a preview or --dry), not executing."""
    return not host.state.is_executing


def will(what: str) -> None:
    """Say, in a preview or dry run, what the current operation would change on the host.

    Call it right before the operation's first command: pyinfra stops reading an operation
    at its first command when it detects changes.
    """
    if previewing():
        logger.info(f"{host.print_prefix}{WILL}{what}")


def fail(message: str) -> StringCommand:
    """A command that fails the host with `message` (one line per problem) on its stderr."""
    return StringCommand(cmd.fail(message))


@operation()
def modules_installed(
    kernel_release: str,
    tarball: str,
    tarball_sha256: str,
    modules: Mapping[str, str],
    set_id: str = "",
    lock_wait: int = LOCK_WAIT_S,
) -> Generator[Any, None, None]:
    """
    Install the verified fix module (the artifact's `ip_vs_reuse.ko`) under
    /lib/modules/<release>/updates/ipvs-fleet; loading it is modules_active's.

    + kernel_release: the host's `uname -r`
    + tarball: local path of the artifact archive (*.ko at its top level)
    + tarball_sha256: its expected sha256, checked again on the host before extracting
    + modules: {file name: sha256} of every module the folder must hold, no more, no less
    + set_id: the build's set id (for the preview line)
    + lock_wait: seconds to wait for the host lock (another controller's step)

    **Example:**

    .. code:: python

        modules_installed(
            name="Install the fix module",
            kernel_release="6.1.0-56-cloud-amd64",
            tarball="artifacts/6.1.0-56-cloud-amd64/ipvs-fleet-modules-6.1.0-56-….tar.gz",
            tarball_sha256="…",
            modules={"ip_vs_reuse.ko": "…"},
        )
    """
    installed = host.get_fact(IpvsInstalledModules, kernel_release=kernel_release)
    if installed == dict(modules):
        host.noop(f"the fix module ({says.names(modules)}) is installed for {kernel_release}")
        return
    dest = updates_dir(kernel_release)
    will(says.install(kernel_release, dest, modules, installed, set_id))
    remote_tar = cmd.incoming(posixpath.basename(tarball))
    yield from root_upload(tarball, remote_tar)
    # Verify the archive, as root where it now lies, then under the host lock every module,
    # before anything replaces the live set (commands.install).
    yield StringCommand(
        cmd.install(dest, kernel_release, remote_tar, tarball_sha256, modules, lock_wait)
    )


@operation()
def modules_built_on_host(
    kernel_release: str,
    tarball: str,
    tarball_sha256: str,
    set_id: str,
    modules: list[str],
) -> Generator[Any, None, None]:
    """
    Build mode: build the fix module on the host with DKMS (from its own linux-headers) and
    install the build under /lib/modules/<release>/updates/ipvs-fleet.

    + kernel_release: the host's `uname -r`
    + tarball: local path of the DKMS tree archive (`ipvs_fleet.build.dkms.dkms_bundle`)
    + tarball_sha256: its sha256, checked on the host before anything is unpacked
    + set_id: the set id every built module must carry
    + modules: module file names the build must hold, no more, no less
    """
    installed = host.get_fact(IpvsInstalledSet, kernel_release=kernel_release)
    if installed == dict.fromkeys(modules, set_id):
        host.noop(f"patch set {set_id} is already built and installed for {kernel_release}")
        return
    will(says.build(set_id, kernel_release, modules, updates_dir(kernel_release)))
    remote_tar = cmd.incoming(posixpath.basename(tarball))
    script = f"{STATE_DIR}/ipvs-dkms-install.sh"
    yield from root_upload(tarball, remote_tar)
    yield from root_upload(DKMS_SCRIPT, script)
    # The script checks the archive; the script itself is checked, as root, in the command
    # that runs it.
    yield StringCommand(
        cmd.dkms_install(
            script,
            sha256_of(DKMS_SCRIPT),
            (remote_tar, tarball_sha256, set_id, kernel_release),
            len(modules),
        )
    )


@operation()
def modules_removed(
    kernel_release: str, lock_wait: int = LOCK_WAIT_S
) -> Generator[Any, None, None]:
    """
    Remove the installed fix module (and a build mode DKMS registration), under the host
    lock (an install or activation of another controller finishes first).

    + kernel_release: the host's `uname -r`
    + lock_wait: seconds to wait for the host lock
    """
    dest = updates_dir(kernel_release)
    dkms = host.get_fact(DkmsVersions)
    installed = host.get_fact(IpvsInstalledModules, kernel_release=kernel_release)
    on_disk = host.get_fact(Directory, path=dest)
    if not dkms and not installed and not on_disk:
        host.noop(f"no ipvs-fleet modules are installed for {kernel_release}")
        return
    will(says.remove_modules(kernel_release, dest, installed, dkms))
    yield StringCommand(cmd.remove_modules(dest, kernel_release, dkms, lock_wait))


def _template_kwargs(
    path: str, host_class: str, sysctls: Mapping[str, int], modules: Iterable[str]
) -> dict[str, Any]:
    """files.template's arguments for `path` (a MANAGED_FILES key) and the host's class."""
    return {
        "src": str(TEMPLATES / MANAGED_FILES[path]),
        # as Ansible renders templates, so both engines write the same bytes
        "jinja_env_kwargs": {"trim_blocks": True},
        "ipvs_host_class": host_class,
        "ipvs_sysctls": dict(sysctls),
        "ipvs_modules": list(modules),
    }


def rendered(path: str, host_class: str, sysctls: Mapping[str, int], modules: Iterable[str]) -> str:
    """The bytes the class's template for `path` renders to, as files.template renders them
    (the role's check-mode report and its write decision render them the same way)."""
    kw = _template_kwargs(path, host_class, sysctls, modules)
    src, env = kw.pop("src"), kw.pop("jinja_env_kwargs")
    return str(get_template(src, env).render(kw))


def sha256_of(src: str | Path | IO[str]) -> str:
    """The sha256 of what `root_upload` sends for `src` (a local path, or text)."""
    if isinstance(src, (str, Path)):
        return hashlib.sha256(Path(src).read_bytes()).hexdigest()
    data = src.read()
    src.seek(0)
    return hashlib.sha256(data.encode()).hexdigest()


def root_upload(src: str | Path | IO[str], dest: str) -> Iterator[Any]:
    """Upload a file to `dest` under STATE_DIR (a host script its run removes, an archive,
    a managed file's copy in this run's new staging folder), reading no fact about it
    (files.put reads three, about 0.15 s each under TCG, and would always find it absent).

    STATE_DIR is made (or made again) root's alone, 0700. Through sudo pyinfra uploads as
    the SSH user to a file of its own (a random name under its temp dir, never one derived
    from `dest`) and copies it to `dest` with sudo: whoever runs as that user can rewrite it
    in between, so whatever uses `dest` as root checks it first
    (`unchanged_or_refused`, in the same root command)."""
    yield StringCommand(cmd.upload_dir(dest))
    local = src if not isinstance(src, (str, Path)) else str(src)
    yield FileUploadCommand(local, dest, remote_temp_filename=host.get_temp_filename())


@operation()
def config_file(
    path: str, settings: HostSettings, lock_wait: int = LOCK_WAIT_S
) -> Generator[Any, None, None]:
    """
    Write one managed file (sysctl.d, modules-load.d or modprobe.d) from the host class's
    template, keeping a one-time backup of whatever was there before.

    + path: a key of MANAGED_FILES
    + settings: the host's policy settings
    + lock_wait: seconds to wait for the host lock (another controller's step)
    """
    backup = backup_path(path)
    # One fact command for what files.template and the backup test would read in five.
    now = host.get_fact(ManagedFile, path=path, backup=backup)
    need_backup = not now["backup"] and not now["absent"]
    template = (path, settings.host_class, settings.sysctls, settings.modules)
    content = rendered(*template)
    sha = hashlib.sha256(content.encode()).hexdigest()
    write = now["mode"] != "644" or now["sha256"] != sha
    if not need_backup and not write:
        host.noop(f"{path} is up to date")
        return
    if write and host.state.config.DIFF:
        # pyinfra's own diff of the file against what it would write (--diff)
        list(files.template._inner(dest=path, mode="0644", **_template_kwargs(*template)))
    will(says.write_file(path, settings.host_class, now["exists"], write, need_backup))
    staged = ""
    if write:
        # Uploaded beside the state, then renamed into place under the host lock: a modprobe
        # of another controller never reads a half-written modprobe.d or sysctl.d file, and a
        # waiting controller finds the file as the other one left it.
        staged = staging_path(path)
        yield from root_upload(StringIO(content), staged)
    yield StringCommand(
        cmd.write_file(
            path, lock_wait, need_backup, staged, sha if write else "", f"{STAGING_DIR}/{RUN_TOKEN}"
        )
    )


@operation()
def config_file_restored(path: str, lock_wait: int = LOCK_WAIT_S) -> Generator[Any, None, None]:
    """
    Put back the file the deploy replaced (or remove the one it created), under the host lock.

    + path: a key of MANAGED_FILES
    + lock_wait: seconds to wait for the host lock (another controller's step)
    """
    now = host.get_fact(ManagedFile, path=path, backup=backup_path(path))
    backup = "file" if now["backup"] else "absent" if now["absent"] else ""
    if not backup:
        host.noop(f"{path} has no backup to restore")
        return
    will(says.restore_file(path, backup))
    yield StringCommand(cmd.restore_file(path, backup, lock_wait))


def is_current(info: Mapping[str, Any], patchset: str) -> bool:
    """Whether the loaded fix module (an IpvsLoadedModules entry) is the build of `patchset`."""
    return bool(info["patched"]) and info["patchset"] == patchset


def is_stock(info: Mapping[str, Any]) -> bool:
    """Whether a loaded IPVS module is the distro's own in-tree build (no O taint)."""
    return "O" not in str(info["taint"] or "")


def foreign_modules(loaded: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Loaded IPVS modules that are neither the distro's own nor the fix module (a patched
    ip_vs set of ipvs-fleet 2.x, say): replacing them means unloading IPVS."""
    return sorted(m for m, info in loaded.items() if m != MODULE_NAME and not is_stock(info))


def verification_problems(
    loaded: Mapping[str, Mapping[str, Any]],
    live: Mapping[str, Any],
    patchset: str,
    sysctls: Mapping[str, int],
) -> list[str]:
    """What differs from the deployed state: the fix module loaded from the `patchset` build
    ("" = not loaded, the rollback), every other IPVS module the distro's own, live values."""
    problems = []
    if "ip_vs" not in loaded:
        problems.append("ip_vs is not loaded")
    fix = loaded.get(MODULE_NAME)
    if patchset and fix is None:
        problems.append(f"{MODULE_NAME} is not loaded")
    elif patchset and fix is not None and not is_current(fix, patchset):
        problems.append(
            f"{MODULE_NAME}: the loaded build is not patch set {patchset} "
            f"(version {fix['version'] or '?'})"
        )
    elif not patchset and fix is not None:
        problems.append(f"{MODULE_NAME} is still loaded")
    for m in foreign_modules(loaded):
        problems.append(
            f"{m}: the loaded build is not the distro's own (taint "
            f"{loaded[m]['taint']}); a reboot loads the stock one"
        )
    if not patchset and KNOB in live:
        problems.append(f"net.ipv4.vs.{KNOB} still exists")
    for key, value in sorted(sysctls.items()):
        if live.get(key) != value:
            problems.append(f"net.ipv4.vs.{key}: expected {value}, live {live.get(key)}")
    return problems


def hooks(what: str, commands: Iterable[str], timeout: int) -> Iterator[StringCommand]:
    """Each drain hook as a command bounded by `timeout`; a failing one fails the host
    there, so nothing after it (the activation, for a pre-hook) runs."""
    for n, command in enumerate(commands, 1):
        yield StringCommand(cmd.hook(what, n, command, timeout))


def activation(
    loaded: Mapping[str, Mapping[str, Any]],
    modules: Iterable[str],
    patchset: str,
    strategy: str,
) -> dict[str, Any]:
    """What modules_active decides for a host, as data (the Ansible role's filter reads the
    same): want (text), fix_version (the loaded fix module's), stale (the fix module to
    unload: loaded from another build, or at all for patchset ""), foreign, missing (class
    modules to modprobe), change (hooks and reboot run for it), loads (what the live
    activation modprobes), boot_loads (what it modprobes after a reboot), refusal (why
    `reload` fails the host, "" when it does not)."""
    fix = loaded.get(MODULE_NAME)
    foreign = foreign_modules(loaded)
    # the fix module goes if loaded from another build, or at all for the rollback ("")
    stale = fix is not None and not (patchset and is_current(fix, patchset))
    missing = [m for m in modules if m not in loaded and (patchset or m != MODULE_NAME)]
    return {
        "want": f"{MODULE_NAME} {patchset}" if patchset else f"no {MODULE_NAME}",
        "fix_version": fix["version"] if fix else None,
        "stale": stale,
        "foreign": foreign,
        "missing": missing,
        "change": bool(stale or foreign or MODULE_NAME in missing),
        "loads": [*missing, *([MODULE_NAME] if stale and patchset else [])],
        # after a reboot: the class's modules (not the fix module in a rollback), whatever
        # was loaded before it
        "boot_loads": [m for m in modules if patchset or m != MODULE_NAME],
        "refusal": says.refusal(foreign) if foreign and strategy == "reload" else "",
    }


@operation()
def modules_active(settings: HostSettings, patchset: str) -> Generator[Any, None, None]:
    """
    Make the running kernel use the installed fix module beside the distro's own IPVS
    modules, by the host's activation strategy; IPVS itself is never unloaded.

    `reload` (live): under the host lock, `modprobe` each class module not loaded (the fix
    module among them) and, where the fix module is loaded from another build, `rmmod` and
    load only it; with patchset "" (the rollback) `rmmod` the fix module. The modprobe.d
    file sets the class's values again whenever ip_vs or the fix module loads. `reboot`
    reboots, `next-boot` leaves it to the next boot. A loaded IPVS module of another
    out-of-tree build cannot be replaced without unloading IPVS: `reload` fails the host
    saying so (a reboot replaces it).

    + settings: the host's policy settings (activation, modules to load, hooks)
    + patchset: the set id the loaded fix module must report; "" for no fix module
    """
    loaded: dict[str, dict[str, Any]] = host.get_fact(IpvsLoadedModules)
    act = activation(loaded, settings.modules, patchset, settings.activation)
    what = says.activation(
        act, settings.activation, len(settings.pre_activate), len(settings.post_activate)
    )
    if not what:
        host.noop(
            f"{act['want']} at next boot"
            if act["change"]
            else f"{act['want']} is active, IPVS modules stock"
        )
        return
    will(what)  # a refusal says so, not "Load the fix module"
    if act["refusal"]:
        yield fail(act["refusal"])
        return
    if act["change"]:
        yield from hooks("pre-activation", settings.pre_activate, settings.hook_timeout)
    if act["change"] and settings.activation == "reboot":
        yield from server.reboot._inner(delay=5, reboot_timeout=600)
        # what modules-load.d does not load at boot (the rollback's restored file may list
        # none): the class's modules, as a live activation would load them
        if act["boot_loads"]:
            yield StringCommand(cmd.load_modules(act["boot_loads"], settings.lock_wait))
    else:
        yield StringCommand(
            cmd.load_modules(act["loads"], settings.lock_wait, MODULE_NAME if act["stale"] else "")
        )
    if act["change"]:
        yield from hooks("post-activation", settings.post_activate, settings.hook_timeout)


@operation()
def sysctl_live(
    key: str,
    value: int,
    activation: str = "reload",
    lock_wait: int = LOCK_WAIT_S,
    if_present: bool = False,
) -> Generator[Any, None, None]:
    """
    Set one net.ipv4.vs.* value in the running kernel, under the host lock (not while another
    controller loads or unloads the fix module).

    + key: the key under net.ipv4.vs
    + value: the class's value
    + activation: the host's strategy; with next-boot a key that needs the fix module
      appears with it at the next boot
    + lock_wait: seconds to wait for the host lock
    + if_present: a key that does not exist is left alone (the rollback's knob 0)
    """
    live = host.get_fact(IpvsSysctls)
    name = f"net.ipv4.vs.{key}"
    if live.get(key) == value:
        host.noop(f"{name} is {value}")
        return
    if key not in live and if_present:
        host.noop(f"{name} does not exist")
        return
    if key not in live:
        if activation == "next-boot":
            host.noop(f"{name} appears with {MODULE_NAME} at next boot")
            return
        if not previewing():
            yield fail(
                f"error: {name} does not exist: ip_vs (or, for {KNOB}, {MODULE_NAME}) is not loaded"
            )
            return
    will(says.set_sysctl(key, value, live.get(key)))
    yield StringCommand(cmd.set_sysctl(key, value, lock_wait))


@operation()
def verified(patchset: str, sysctls: Mapping[str, int]) -> Generator[Any, None, None]:
    """
    Fail the host unless the running state is what was deployed: the fix module loaded from
    the expected build (or, for "", not loaded), every other IPVS module the distro's own,
    the given values live. A step of the execution: it reads the host when it runs, after
    the operations before it, and changes nothing; a preview or dry run only notes that it
    will run.

    + patchset: the expected set id; "" for no fix module (then the knob must not exist)
    + sysctls: {key: value} that must be live
    """
    what = f"{MODULE_NAME} {patchset}" if patchset else f"the stock IPVS modules, no {MODULE_NAME}"
    if previewing():
        host.noop(f"verification of {what} runs after the changes")
        return
    loaded: dict[str, dict[str, Any]] = host.get_fact(IpvsLoadedModules)
    live: dict[str, Any] = host.get_fact(IpvsSysctls)
    problems = verification_problems(loaded, live, patchset, sysctls)
    if problems:
        yield fail(f"verification failed on {host.name}: " + "; ".join(problems))
        return
    host.noop(f"verified: {what}")
