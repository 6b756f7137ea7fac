"""Lab VM images: one ext4 disk image per Debian release, booted directly by QEMU.

An image is an mmdebstrap root (`rootfs.make_root`) with the release's pinned cloud kernel
(the lock's, `debian.pinned_kernel`: the newest of the release, with a warning, when the
archive no longer has the locked one),
turned into a raw ext4 file by `mke2fs -d` (no loop mount), plus the kernel and initrd for
QEMU's direct boot. Images live in a shared cache (`$IPVS_FLEET_CACHE/lab-images/<key>/`)
named by everything they are made from, so several labs reuse them and a new kernel pin or
package list makes a new image. The image holds no keys: each lab hands its SSH keys to its
VMs at boot on a small seed disk (see `seed_tar`).
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ipvs_fleet import debian
from ipvs_fleet.debian import ArchiveUnreachable, KernelPin, locked_pin, pinned_kernel
from ipvs_fleet.errors import FleetError
from ipvs_fleet.rootfs import make_root

# Bump when the way an image is made changes (customisation, mke2fs options).
FORMAT_VERSION = 5

# What every lab VM carries. Others may extend it (e.g. `LAB_PACKAGES.append("socat")`
# before `Lab.up()`); the image key covers the list, so a change makes a new image.
LAB_PACKAGES: list[str] = [
    "systemd-sysv",
    "udev",  # systemd-networkd waits for udev to initialise the link
    "initramfs-tools",
    "openssh-server",
    "python3",  # Ansible and the probe
    "iproute2",
    "ipvsadm",
    "iptables",
    "ipset",  # kube-proxy's IPVS mode matches its service sets (the reuse ruleset matrix)
    "conntrack",
    "kmod",
    "procps",
    "vsftpd",  # passive FTP through ip_vs_ftp on the ftp class
    "tcpdump",
    "sudo",  # the non-root SSH users (SUDO_USERS)
    # the kernel's own IPVS selftest, ipvs.sh (tests/lab/test_kernel_selftest.py): nc up
    # to 6.1, socat from 6.12 on
    "netcat-openbsd",
    "socat",
]

# Non-root users for the deploy's sudo path, keyed with the lab's client key like root:
# `fleet` has passwordless sudo (inventory/lab_sudo.py), `fleetpw` a sudo that asks for a
# password (the refusal tests). Root login stays for the lab's own tools.
SUDO_USERS = {
    "fleet": "fleet ALL=(ALL:ALL) NOPASSWD: ALL\n",
    "fleetpw": "fleetpw ALL=(ALL:ALL) ALL\n",
}

IMAGE_SIZE = "4G"  # sparse; only written blocks use disk space

Log = Callable[[str], None]


@dataclass(frozen=True)
class Image:
    """A built lab image in the cache."""

    release: str
    pin: KernelPin
    dir: Path

    @property
    def rootfs(self) -> Path:
        return self.dir / "rootfs.img"

    @property
    def kernel(self) -> Path:
        return self.dir / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.dir / "initrd.img"


def cache_dir() -> Path:
    return debian.CACHE / "lab-images"


def image_key(pin: KernelPin, packages: Sequence[str]) -> str:
    h = hashlib.sha256(
        "\n".join([f"format={FORMAT_VERSION}", pin.key, *sorted(packages)]).encode()
    ).hexdigest()
    return f"{pin.release}-{pin.kernel_release}-{h[:12]}"


# The guest side of the seed disk: /dev/vdb is a plain tar (keys, authorized_keys) that
# is unpacked over / before sshd starts, on every boot.
SEED_SCRIPT = """#!/bin/sh
set -e
[ -b /dev/vdb ] || exit 0
tar -xf /dev/vdb -C /
# the lab's client key for the non-root users too
for u in fleet fleetpw; do
    id "$u" >/dev/null 2>&1 || continue
    install -d -o "$u" -g "$u" -m 0700 "/home/$u/.ssh"
    install -o "$u" -g "$u" -m 0600 /root/.ssh/authorized_keys "/home/$u/.ssh/authorized_keys"
done
"""

SEED_UNIT = """[Unit]
Description=ipvs-fleet lab seed (SSH keys from /dev/vdb)
DefaultDependencies=no
After=local-fs.target
Before=ssh.service ssh.socket sysinit.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/ipvs-fleet-seed

[Install]
WantedBy=sysinit.target
"""

# Installed before the kernel (mmdebstrap essential hook), so that the one initrd the kernel
# package makes holds only what mounts /dev/vda: a fraction of MODULES=most, which under TCG
# costs tens of seconds of udev coldplug per boot. ext4 and crc32c are built into the
# cloud kernels; virtio_pci is built in from 6.12 (force_load then does nothing).
INITRAMFS_CONF = """# ipvs-fleet lab VM: root is virtio /dev/vda
MODULES=list
COMPRESS=gzip
"""

INITRAMFS_HOOK = """#!/bin/sh
[ "$1" = prereqs ] && exit 0
. /usr/share/initramfs-tools/hook-functions
force_load virtio_pci
force_load virtio_blk
"""

NETWORK = """[Match]
Name=eth* en*

[Network]
DHCP=ipv4
"""

SSHD = """# ipvs-fleet lab: root by key only; host keys come from the seed disk.
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UseDNS no
"""

# Units that only cost boot time in a lab VM (a missing one is ignored by `systemctl mask`).
MASK = [
    "systemd-networkd-wait-online.service",
    "systemd-firstboot.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "man-db.timer",
    "dpkg-db-backup.timer",
    "getty-static.service",
    # The project drives IPVS itself; the package's boot script only costs time.
    "ipvsadm.service",
    # Modules, device nodes and mounts no lab test uses: under TCG each costs a process and
    # a module load at boot, three VMs at once on two cores (kmod-static-nodes is on the way
    # to sshd: udevd waits for it; a module's node still appears when it loads).
    "kmod-static-nodes.service",
    "modprobe@dm_mod.service",
    "modprobe@efi_pstore.service",
    "modprobe@fuse.service",
    "modprobe@loop.service",
    "modprobe@drm.service",
    "sys-fs-fuse-connections.mount",
    "systemd-binfmt.service",
    "proc-sys-fs-binfmt_misc.automount",
    "proc-sys-fs-binfmt_misc.mount",
    "systemd-network-generator.service",  # ip= on the kernel command line: none
]

# Written like systemd-update-done does: with it newer than /usr, the first boot skips
# ldconfig, hwdb and catalog rebuilds (ConditionNeedsUpdate), which take a minute under TCG.
UPDATED = (
    "# This file was created by ipvs-fleet when the lab image was made, standing in for\n"
    "# systemd-update-done: package installs already ran ldconfig, hwdb and catalog updates.\n"
)


def _write(root: Path, rel: str, text: str, mode: int = 0o644) -> None:
    p = root / rel.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.unlink(missing_ok=True)  # never write through a symlink into the host
    p.write_text(text)
    p.chmod(mode)


def customise(root: Path) -> None:
    """Make a root bootable as a lab VM: fstab, DHCP, sshd, the seed unit. Idempotent.

    Paths are under /etc and /usr/local only, which are the same whether or not the
    release's root is merged-/usr (bullseye may not be).
    """
    _write(root, "/etc/fstab", "/dev/vda / ext4 rw,errors=remount-ro 0 0\n")
    _write(root, "/etc/systemd/network/20-lab.network", NETWORK)
    _write(root, "/etc/ssh/sshd_config.d/ipvs-fleet.conf", SSHD)
    _write(root, "/usr/local/sbin/ipvs-fleet-seed", SEED_SCRIPT, 0o755)
    _write(root, "/etc/systemd/system/ipvs-fleet-seed.service", SEED_UNIT)
    _write(root, "/etc/hostname", "lab\n")  # systemd.hostname= on the command line wins
    for key in (root / "etc" / "ssh").glob("ssh_host_*"):
        key.unlink()
    _chroot(root, "systemctl", "enable", "systemd-networkd.service", "ipvs-fleet-seed.service")
    _chroot(root, "systemctl", "mask", *MASK)
    # Locked password, key login only (a `*` hash still allows public keys).
    _chroot(root, "usermod", "-p", "*", "root")
    for user, rule in SUDO_USERS.items():
        if subprocess.run(["chroot", str(root), "id", user], capture_output=True).returncode:
            _chroot(root, "useradd", "--create-home", "--shell", "/bin/sh", user)
        _chroot(root, "usermod", "-p", "*", user)
        _write(root, f"/etc/sudoers.d/{user}", rule, 0o440)
    for rel in ("/etc/.updated", "/var/.updated"):
        _write(root, rel, UPDATED)  # last, so that it is newer than /usr


def _chroot(root: Path, *cmd: str) -> None:
    r = subprocess.run(["chroot", str(root), *cmd], capture_output=True, text=True)
    if r.returncode != 0:
        raise FleetError(f"image customisation `{' '.join(cmd)}` failed: {r.stderr.strip()}")


def fleet_packages(extra: Sequence[str]) -> list[str] | None:
    """build_image's `packages` for a fleet host's own `packages` (None: LAB_PACKAGES)."""
    return [*LAB_PACKAGES, *extra] if extra else None


def image_packages(
    pin: KernelPin, packages: Sequence[str] | None = None, build_tools: bool = False
) -> list[str]:
    """The package list of an image: LAB_PACKAGES (or `packages`), the release's own
    `lab_packages` (kernel/releases.yml), the pinned kernel, and with build_tools what a
    builder root has."""
    pkgs = list(LAB_PACKAGES if packages is None else packages)
    pkgs += [p for p in debian.RELEASE_INFO[pin.release].lab_packages if p not in pkgs]
    pkgs.append(f"{pin.image_package}={pin.version}")
    if build_tools:
        from ipvs_fleet.build.builder import builder_packages

        pkgs += [p for p in builder_packages(pin) if p not in pkgs]
    return pkgs


def build_image(
    release: str,
    packages: Sequence[str] | None = None,
    *,
    build_tools: bool = False,
    log: Log = print,
    logfile: Path | None = None,
) -> Image:
    """The lab image of a release, from the cache or built now (locked against other labs).

    build_tools adds what a host needs to build the set itself (build mode): dkms, the
    compiler and the pinned kernel's own headers and linux-source (as a builder root has).
    Without the Debian mirror (offline), the cached image of the locked pin is used, else the
    newest cached image of the release.
    """
    try:
        pin = pinned_kernel(release, offline_ok=False)
    except ArchiveUnreachable as e:
        locked = locked_pin(release)
        key = image_key(locked, image_packages(locked, packages, build_tools))
        image = Image(release, locked, cache_dir() / key)
        if (image.dir / "image.json").exists():
            return image
        cached = newest_cached(release)
        if cached is None:
            raise
        log(f"{release}: {e}; using cached image {cached.dir.name}")
        return cached
    pkgs = image_packages(pin, packages, build_tools)
    key = image_key(pin, pkgs)
    dest = cache_dir() / key
    image = Image(release, pin, dest)
    if (dest / "image.json").exists():
        return image
    dest.parent.mkdir(parents=True, exist_ok=True)
    with (dest.parent / f"{key}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another lab may be building the same image
        if (dest / "image.json").exists():
            return image
        t0 = time.monotonic()
        log(f"{release}: building image {key} (kernel {pin.kernel_release} {pin.version})")
        partial = dest.with_name(key + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
        early = partial / "early"
        _write(early, "/etc/initramfs-tools/conf.d/ipvs-fleet-lab.conf", INITRAMFS_CONF)
        _write(early, "/etc/initramfs-tools/hooks/ipvs-fleet-lab", INITRAMFS_HOOK, 0o755)
        hooks = [f"--essential-hook=sync-in {early} /"]
        root = make_root(release, pkgs, partial / "root", hooks=hooks, log=logfile)
        customise(root)
        boot = root / "boot"
        shutil.copyfile(boot / f"vmlinuz-{pin.kernel_release}", partial / "vmlinuz")
        shutil.copyfile(boot / f"initrd.img-{pin.kernel_release}", partial / "initrd.img")
        (root / ".complete").unlink(missing_ok=True)
        r = subprocess.run(
            [
                "mke2fs",
                "-q",
                "-F",
                "-t",
                "ext4",
                "-L",
                "labroot",
                "-d",
                str(root),
                str(partial / "rootfs.img"),
                IMAGE_SIZE,
            ],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            raise FleetError(f"mke2fs for {release} image failed: {r.stderr.strip()}")
        shutil.rmtree(root)
        shutil.rmtree(early)
        (partial / "image.json").write_text(
            json.dumps(
                {
                    "release": release,
                    "kernel_release": pin.kernel_release,
                    "kernel_version": pin.version,
                    "packages": pkgs,
                    "format": FORMAT_VERSION,
                },
                indent=2,
            )
        )
        shutil.rmtree(dest, ignore_errors=True)
        partial.rename(dest)
        log(f"{release}: image ready in {time.monotonic() - t0:.0f} s")
    return image


def newest_cached(release: str) -> Image | None:
    """The most recently built image of a release in the cache, if any."""
    found = sorted(
        (p.stat().st_mtime, p.parent) for p in cache_dir().glob(f"{release}-*/image.json")
    )
    if not found:
        return None
    info = json.loads((found[-1][1] / "image.json").read_text())
    line = debian.RELEASES[release]
    pin = KernelPin(release, line, info["kernel_release"], info["kernel_version"])
    return Image(release, pin, found[-1][1])


def seed_tar(dest: Path, authorized_key: str, host_key: Path, hostname: str = "") -> None:
    """Write the seed disk of one VM: root's authorized_keys and the VM's SSH host key."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:

        def add(name: str, data: bytes, mode: int) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, int(time.time())
            tar.addfile(info, io.BytesIO(data))

        def add_dir(name: str, mode: int) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, mode
            tar.addfile(info)

        add_dir("root/.ssh", 0o700)
        add("root/.ssh/authorized_keys", authorized_key.encode(), 0o600)
        add("etc/ssh/ssh_host_ed25519_key", host_key.read_bytes(), 0o600)
        pub = host_key.with_name(host_key.name + ".pub")
        add("etc/ssh/ssh_host_ed25519_key.pub", pub.read_bytes(), 0o644)
        if hostname:  # sudo resolves its own host name (else it warns on every command)
            hosts = f"127.0.0.1\tlocalhost\n127.0.1.1\t{hostname}\n::1\tlocalhost ip6-localhost\n"
            add("etc/hosts", hosts.encode(), 0o644)
    data = buf.getvalue()
    data += b"\0" * (-len(data) % 4096)  # whole sectors for the block device
    dest.write_bytes(data)


def images_in_use() -> set[Path]:
    """Image dirs a running QEMU boots from (its -kernel or disk backing lives there)."""
    used: set[Path] = set()
    root = cache_dir()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue  # the process ended
        if not argv or not argv[0].endswith(b"qemu-system-x86_64"):
            continue
        for arg in argv:
            s = arg.decode(errors="replace")
            for part in s.split(","):
                p = Path(part.split("=", 1)[-1])
                if p.is_absolute() and root in p.parents:
                    used.add(root / p.relative_to(root).parts[0])
    # An overlay names its backing image inside the qcow2 header, not on QEMU's command line:
    # the -kernel argument of the same VM is in the same image dir, so the scan above has it.
    return used


def _being_built(image_dir: Path) -> bool:
    """Whether another process holds the image's build lock (see build_image)."""
    lock = image_dir.with_name(image_dir.name + ".lock")
    if not lock.exists():
        return False
    with lock.open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def fleet_image_kinds(fleets: Sequence[Path] = ()) -> set[tuple[str, bool, tuple[str, ...]]]:
    """(release, build_tools, packages) of every host of the lab's own fleet files (lab/*.yml:
    lab/fleet.yml, lab/fleet-7.2.yml), of the fleet in use ($IPVS_FLEET_FLEET) and of
    `fleets`. A file that does not load is an error (ConfigError naming it)."""
    from ipvs_fleet.lab.fleet import fleet_path, load_fleet
    from ipvs_fleet.resources import data_path

    paths = [*sorted(data_path("lab").glob("*.yml")), *fleets]
    if fleet_path().exists():  # the packaged default, or a file the user named
        paths.append(fleet_path())
    kinds = set()
    for path in paths:
        for h in load_fleet(path).hosts.values():
            kinds.add((h.release, h.build_tools, h.packages))
    return kinds


def prune_images(*, dry_run: bool = False, fleets: Sequence[Path] = ()) -> list[tuple[Path, str]]:
    """Remove cached lab images that the current pins and package lists no longer produce.

    Kept: for the kernel of each release's locked pin and the one `build_image` uses now
    (they differ when the archive dropped the locked one), the plain image, the one with
    build tools, and the image of every host of the fleet files (`fleet_image_kinds`: a
    release only one of them boots, sid in lab/fleet-7.2.yml, is no less in use); the newest
    cached image of a release when the mirror cannot be reached; every image a running VM
    boots from. Returns (path, why) of what was (or, with dry_run, would be) removed.
    """
    root = cache_dir()
    if not root.is_dir():
        return []
    kinds = fleet_image_kinds(fleets)  # before anything goes: a bad fleet file removes nothing
    keep = set(images_in_use())
    for release in debian.RELEASES:
        pins = [locked_pin(release)]
        try:
            pins.append(pinned_kernel(release, strict=False, offline_ok=False))
        except FleetError:  # the mirror cannot be reached (or answers nonsense)
            cached = newest_cached(release)
            if cached is not None:
                keep.add(cached.dir)
        for pin in pins:
            keep.add(root / image_key(pin, image_packages(pin)))
            keep.add(root / image_key(pin, image_packages(pin, build_tools=True)))
            for _, tools, extra in (k for k in kinds if k[0] == release):
                keep.add(root / image_key(pin, image_packages(pin, fleet_packages(extra), tools)))
    removed: list[tuple[Path, str]] = []
    for p in sorted(root.iterdir()):
        target = p.with_suffix("") if p.suffix == ".lock" else p
        if target in keep or _being_built(target):
            continue
        why = (
            "stale lock"
            if p.suffix == ".lock"
            else ("unfinished build" if not (p / "image.json").exists() else "superseded image")
        )
        removed.append((p, why))
        if not dry_run:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    return removed
