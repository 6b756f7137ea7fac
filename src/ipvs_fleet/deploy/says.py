"""What a run would change on a host, one sentence per change, written once for both engines.

The pyinfra operations say it in a preview as `[host] will <sentence>` (operations.will);
the Ansible role's check-mode report (the filter's `ipvs_fleet_pending`) lists the same
sentences in the same order, so a preview and a check-mode run of the same host read alike.
Each function takes what the facts read; the decisions stay with the operations.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ipvs_fleet.kernel import MODULE_NAME


def names(items: Iterable[str]) -> str:
    return ", ".join(items)


def install(
    kernel_release: str,
    dest: str,
    modules: Mapping[str, str],
    installed: Mapping[str, str],
    set_id: str = "",
) -> str:
    """The install of `modules` ({file: sha256}) over what is `installed` in `dest`."""
    what = f"patch set {set_id}" if set_id else "the fix module"
    if installed:
        differ = {n for n, _ in set(installed.items()) ^ set(modules.items())}
        return (
            f"replace the installed build for {kernel_release} with {what} "
            f"({len(differ)} module file(s) differ)"
        )
    return (
        f"install {what} for {kernel_release}: {names(modules)} into {dest} "
        "(sha256-verified), depmod"
    )


def build(set_id: str, kernel_release: str, modules: Iterable[str], dest: str) -> str:
    """Build mode: the DKMS build on the host and its install."""
    return (
        f"build patch set {set_id} on the host with DKMS for {kernel_release} "
        f"({names(modules)}) and install it into {dest}"
    )


def remove_modules(
    kernel_release: str, dest: str, installed: Iterable[str], dkms: Iterable[str]
) -> str:
    """The rollback's removal of the installed modules (an unindexed copy: a folder depmod
    never indexed) and of a DKMS registration."""
    parts = [f"{names(sorted(installed)) or 'an unindexed copy'} in {dest}"]
    if dkms := list(dkms):
        parts.append(f"DKMS ipvs-fleet {names(dkms)}")
    return f"remove the ipvs-fleet module set for {kernel_release} ({'; '.join(parts)}), depmod"


def write_file(path: str, host_class: str, exists: bool, write: bool, keep: bool) -> str:
    """A managed file written (created if it does not `exist`) and/or its previous state
    kept once for the rollback (`keep`)."""
    what = [f"{'rewrite' if exists else 'create'} {path} ({host_class})"] if write else []
    if keep:
        what.append(
            f"keep the previous {path} for rollback"
            if exists
            else f"note for rollback that {path} did not exist"
        )
    return "; ".join(what)


def restore_file(path: str, backup: str) -> str:
    """The rollback of a managed file: `backup` "file" (a copy kept) or "absent"."""
    if backup == "file":
        return f"restore {path} from the copy kept by the first deploy"
    return f"remove {path} (the deploy created it)"


def refusal(foreign: Iterable[str]) -> str:
    """Why `reload` fails a host with loaded IPVS modules of another out-of-tree build."""
    return (
        f"{names(foreign)}: loaded from an out-of-tree build that is not the fix "
        "module; replacing it would unload IPVS and drop its tables and connections: "
        "reboot the host (host data ipvs_activation: reboot)"
    )


def activation(act: Mapping[str, Any], strategy: str, pre: int, post: int) -> str:
    """What the activation does ("" = nothing now): `act` is operations.activation's
    decision, `pre` and `post` the number of drain hooks."""
    if not act["change"] and not act["missing"]:
        return ""
    if act["change"] and strategy == "next-boot":
        return ""  # the running kernel keeps its modules until the next boot
    if act["refusal"]:
        return f"fail the host: {act['refusal']}"
    what = []
    if act["change"] and pre:
        what.append(f"run {pre} pre-activation hook(s)")
    if act["change"] and strategy == "reboot":
        foreign = f" (and stock {names(act['foreign'])})" if act["foreign"] else ""
        what.append(f"reboot for {act['want']}{foreign}")
    else:
        if act["stale"]:
            what.append(
                f"unload {MODULE_NAME} {act['fix_version'] or ''} (IPVS stays "
                "loaded, its tables untouched)"
            )
        if act["loads"]:
            what.append(f"load {names(act['loads'])}")
    if act["change"] and post:
        what.append(f"run {post} post-activation hook(s)")
    return "; ".join(what)


def set_sysctl(key: str, value: int, live: Any) -> str:
    """One net.ipv4.vs value set live; `live` None: the key appears with the modules."""
    if live is None:
        return (
            f"set net.ipv4.vs.{key} = {value} (the key appears once the modules above are active)"
        )
    return f"set net.ipv4.vs.{key} = {value} (live {live})"
