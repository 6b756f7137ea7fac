"""pyinfra operations that converge a host's IPVS stack; each yields only what closes the gap."""

from __future__ import annotations

import posixpath
from collections.abc import Generator, Mapping
from pathlib import Path
from typing import Any

from pyinfra import host
from pyinfra.api import OperationError, QuoteString, StringCommand, operation
from pyinfra.facts.files import File
from pyinfra.operations import files, server

from ipvs_fleet.deploy.facts import (
    DkmsVersions,
    IpvsInstalledModules,
    IpvsInstalledSet,
    IpvsLoadedModules,
    IpvsSysctls,
    updates_dir,
)
from ipvs_fleet.policy import KNOB, HostSettings

STATE_DIR = "/var/lib/ipvs-fleet"
ROLE = Path(__file__).resolve().parents[3] / "roles" / "ipvs_fleet"
TEMPLATES = ROLE / "templates"
SWAP_SCRIPT = ROLE / "files" / "ipvs-swap.sh"
DKMS_SCRIPT = ROLE / "files" / "ipvs-dkms-install.sh"
SYSCTL_FILE = "/etc/sysctl.d/90-ipvs-fleet.conf"
MODULES_LOAD_FILE = "/etc/modules-load.d/ipvs-fleet.conf"
MODPROBE_FILE = "/etc/modprobe.d/ipvs-fleet.conf"
# Files the deploy owns: target path -> template; each is backed up once before the first
# write so that rollback can put the previous one back (or remove ours).
MANAGED_FILES = {
    SYSCTL_FILE: "90-ipvs-fleet.conf.j2",
    MODULES_LOAD_FILE: "ipvs-fleet-modules.conf.j2",
    MODPROBE_FILE: "ipvs-fleet-modprobe.conf.j2",
}


def backup_path(path: str) -> str:
    return f"{STATE_DIR}/backup{path}"


@operation()
def modules_installed(
    kernel_release: str,
    tarball: str,
    tarball_sha256: str,
    modules: Mapping[str, str],
) -> Generator[Any, None, None]:
    """
    Install a verified module set under /lib/modules/<release>/updates/ipvs-fleet.

    + kernel_release: the host's `uname -r`
    + tarball: local path of the artifact archive (*.ko at its top level)
    + tarball_sha256: its expected sha256, checked again on the host before extracting
    + modules: {file name: sha256} of every module the set must hold, no more, no less

    **Example:**

    .. code:: python

        modules_installed(
            name="Install the patched IPVS modules",
            kernel_release="6.1.0-56-cloud-amd64",
            tarball="artifacts/6.1.0-56-cloud-amd64/ipvs-fleet-modules.tar.gz",
            tarball_sha256="…",
            modules={"ip_vs.ko": "…"},
        )
    """
    installed = host.get_fact(IpvsInstalledModules, kernel_release=kernel_release)
    if installed == dict(modules):
        host.noop(f"the patched IPVS modules are already installed for {kernel_release}")
        return
    dest = updates_dir(kernel_release)
    remote_tar = f"{STATE_DIR}/incoming/{posixpath.basename(tarball)}"
    yield from files.put._inner(src=tarball, dest=remote_tar, mode="0600")
    staging = f"{dest}.new"
    sums = "\n".join(f"{sha}  {name}" for name, sha in sorted(modules.items()))
    # Verify the archive, then every module, before anything replaces the live set.
    yield StringCommand(
        "echo", QuoteString(f"{tarball_sha256}  {remote_tar}"), "| sha256sum -c --quiet"
    )
    yield StringCommand(
        "rm -rf", QuoteString(staging), "&& mkdir -p", QuoteString(staging),
        "&& tar -xzf", QuoteString(remote_tar), "-C", QuoteString(staging),
        "&& cd", QuoteString(staging),
        "&& printf '%s\\n'", QuoteString(sums), "| sha256sum -c --quiet --strict",
        "&& [ $(ls", QuoteString(staging), "| wc -l) -eq", str(len(modules)), "]",
    )  # fmt: skip
    old = f"{dest}.old"
    yield StringCommand(
        "rm -rf", QuoteString(old),
        "&& { [ ! -d", QuoteString(dest), "] || mv", QuoteString(dest), QuoteString(old), "; }",
        "&& mv", QuoteString(staging), QuoteString(dest),
        "&& rm -rf", QuoteString(old), QuoteString(remote_tar),
        "&& depmod", QuoteString(kernel_release),
    )  # fmt: skip


@operation()
def modules_built_on_host(
    kernel_release: str,
    tarball: str,
    tarball_sha256: str,
    set_id: str,
    modules: list[str],
) -> Generator[Any, None, None]:
    """
    Build mode: build the set on the host with DKMS (its own headers and linux-source) and
    install the build under /lib/modules/<release>/updates/ipvs-fleet.

    + kernel_release: the host's `uname -r`
    + tarball: local path of the DKMS tree archive (`ipvs_fleet.build.dkms.dkms_bundle`)
    + tarball_sha256: its sha256, checked on the host before anything is unpacked
    + set_id: the patch-set version every built module must carry
    + modules: module file names the set must hold, no more, no less
    """
    installed = host.get_fact(IpvsInstalledSet, kernel_release=kernel_release)
    if installed == dict.fromkeys(modules, set_id):
        host.noop(f"patch set {set_id} is already built and installed for {kernel_release}")
        return
    remote_tar = f"{STATE_DIR}/incoming/{posixpath.basename(tarball)}"
    script = f"{STATE_DIR}/ipvs-dkms-install.sh"
    yield from files.put._inner(src=tarball, dest=remote_tar, mode="0600")
    yield from files.put._inner(src=str(DKMS_SCRIPT), dest=script, mode="0755")
    args = [QuoteString(a) for a in (remote_tar, tarball_sha256, set_id, kernel_release)]
    q = QuoteString(script)
    yield StringCommand(q, *args, str(len(modules)), "; rc=$?; rm -f", q, "; exit $rc")


@operation()
def modules_removed(kernel_release: str) -> Generator[Any, None, None]:
    """
    Remove the ipvs-fleet module set (and a build mode DKMS registration) so that modprobe
    resolves the stock modules again.

    + kernel_release: the host's `uname -r`
    """
    dest = updates_dir(kernel_release)
    for v in host.get_fact(DkmsVersions):
        yield StringCommand(
            "dkms remove -m ipvs-fleet -v", QuoteString(v), "--all >/dev/null 2>&1;",
            "rm -rf", QuoteString(f"/var/lib/dkms/ipvs-fleet/{v}"),
            QuoteString(f"/usr/src/ipvs-fleet-{v}"),
        )  # fmt: skip
    if not host.get_fact(IpvsInstalledModules, kernel_release=kernel_release) and not (
        host.get_fact(File, path=f"{dest}.failed")
    ):
        host.noop(f"no ipvs-fleet modules are installed for {kernel_release}")
        return
    yield StringCommand(
        "rm -rf", QuoteString(dest), QuoteString(f"{dest}.failed"),
        "&& depmod", QuoteString(kernel_release),
    )  # fmt: skip


@operation()
def config_files(settings: HostSettings) -> Generator[Any, None, None]:
    """
    Write the sysctl.d, modules-load.d and modprobe.d files of the host's class, keeping a
    one-time backup of whatever was there before.

    + settings: the host's policy settings
    """
    for path, template in MANAGED_FILES.items():
        backup = backup_path(path)
        if host.get_fact(File, path=backup) is None and (
            host.get_fact(File, path=backup + ".absent") is None
        ):
            q, b = QuoteString(path), QuoteString(backup)
            yield StringCommand(
                "mkdir -p", QuoteString(posixpath.dirname(backup)),
                "&& if [ -f", q, "]; then cp -p", q, b,
                "; else touch", QuoteString(backup + ".absent"), "; fi",
            )  # fmt: skip
        yield from files.template._inner(
            src=str(TEMPLATES / template),
            dest=path,
            mode="0644",
            # as Ansible renders templates, so both engines write the same bytes
            jinja_env_kwargs={"trim_blocks": True},
            ipvs_host_class=settings.host_class,
            ipvs_sysctls=settings.sysctls,
            ipvs_modules=list(settings.modules),
        )


@operation()
def config_files_restored() -> Generator[Any, None, None]:
    """Put back the files the deploy replaced (or remove the ones it created)."""
    for path in MANAGED_FILES:
        backup = backup_path(path)
        q, b, absent = QuoteString(path), QuoteString(backup), QuoteString(backup + ".absent")
        if host.get_fact(File, path=backup):
            yield StringCommand("cp -p", b, q, "&& rm -f", b)
        elif host.get_fact(File, path=backup + ".absent"):
            yield StringCommand("rm -f", q, absent)
        else:
            host.noop(f"{path} has no backup to restore")


def is_current(info: Mapping[str, Any], patchset: str) -> bool:
    """Whether a loaded module (IpvsLoadedModules entry) is the wanted build ("" = stock)."""
    if patchset:
        return bool(info["patched"]) and info["patchset"] == patchset
    return "O" not in str(info["taint"] or "")


def verification_problems(
    loaded: Mapping[str, Mapping[str, Any]],
    live: Mapping[str, Any],
    patchset: str,
    sysctls: Mapping[str, int],
) -> list[str]:
    """What differs from the deployed state: loaded build ("" = stock) and live values."""
    problems = []
    if "ip_vs" not in loaded:
        problems.append("ip_vs is not loaded")
    for m, info in sorted(loaded.items()):
        if not is_current(info, patchset):
            what = f"patch set {patchset}" if patchset else "the stock build"
            problems.append(f"{m}: the loaded build is not {what}")
    if not patchset and KNOB in live:
        problems.append(f"net.ipv4.vs.{KNOB} still exists")
    for key, value in sorted(sysctls.items()):
        if live.get(key) != value:
            problems.append(f"net.ipv4.vs.{key}: expected {value}, live {live.get(key)}")
    return problems


@operation()
def modules_active(settings: HostSettings, patchset: str) -> Generator[Any, None, None]:
    """
    Make the running kernel use the installed module set, by the host's activation strategy.

    + settings: the host's policy settings (activation, modules to load)
    + patchset: the patch-set version the loaded ip_vs must report; "" for the stock build
    """
    loaded = host.get_fact(IpvsLoadedModules)
    want_patched = bool(patchset)
    stale = sorted(m for m, info in loaded.items() if not is_current(info, patchset))
    if loaded and stale:
        what = "patched" if want_patched else "stock"
        if settings.activation == "next-boot":
            host.noop(f"{', '.join(stale)} switch to the {what} build at next boot")
            return
        if settings.activation == "reboot":
            yield from server.reboot._inner(delay=5, reboot_timeout=600)
        else:
            script = f"{STATE_DIR}/ipvs-swap.sh"
            yield from files.put._inner(src=str(SWAP_SCRIPT), dest=script, mode="0755")
            # Run and remove, as Ansible's script module does: both engines leave the same
            # host state (the script's own table copies stay, for the record).
            q = QuoteString(script)
            yield StringCommand(q, "; rc=$?; rm -f", q, "; exit $rc")
    missing = [m for m in settings.modules if m not in loaded or m in stale]
    if missing:
        names = [QuoteString(m) for m in missing]
        yield StringCommand("for m in", *names, '; do modprobe "$m"; done')
    elif not stale:
        host.noop(f"the {'patched' if want_patched else 'stock'} IPVS modules are active")


@operation()
def sysctls_live(settings: HostSettings) -> Generator[Any, None, None]:
    """
    Set the class's net.ipv4.vs.* values in the running kernel.

    + settings: the host's policy settings
    """
    live = host.get_fact(IpvsSysctls)
    for key, value in sorted(settings.sysctls.items()):
        if key not in live:
            if settings.activation == "next-boot":
                host.noop(f"net.ipv4.vs.{key} appears with the patched module at next boot")
                continue
            raise OperationError(
                f"net.ipv4.vs.{key} does not exist on {host.name}: ip_vs not loaded or stock"
            )
        yield from server.sysctl._inner(key=f"net.ipv4.vs.{key}", value=value)


@operation()
def verified(patchset: str, sysctls: Mapping[str, int]) -> Generator[Any, None, None]:
    """
    Fail the host unless the running state is what was deployed (reads facts, changes
    nothing): every loaded IPVS module from the expected build, the given values live.

    + patchset: the expected patch-set version; "" for the stock build (then the knob
      must not exist)
    + sysctls: {key: value} that must be live
    """
    loaded: dict[str, dict[str, Any]] = host.get_fact(IpvsLoadedModules)
    live: dict[str, Any] = host.get_fact(IpvsSysctls)
    problems = verification_problems(loaded, live, patchset, sysctls)
    if problems:
        raise OperationError(f"{host.name} not verified: " + "; ".join(problems))
    host.noop(f"verified: {'patch set ' + patchset if patchset else 'stock build'}")
    yield from ()
