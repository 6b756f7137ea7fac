"""The lab fleet: QEMU VMs with real Debian kernels, reachable over SSH with host keys checked.

>>> lab = Lab()                       # $IPVS_FLEET_LAB_DIR or <repo>/.lab
>>> lab.up()                          # boots the fleet of lab/fleet.yml; a no-op when up
>>> lab.run("k8s-canary", "uname -r").stdout
'6.1.0-56-cloud-amd64\\n'
>>> lab.down()

Files in the lab dir: `state.json` (the running hosts), `ssh_config`, `ssh/` (the lab's
client key, known_hosts, per-host host keys), `vms/<name>/` (overlay, seed, pidfile,
console.log), `logs/` (image builds).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ipvs_fleet.errors import ConfigError, FleetError
from ipvs_fleet.lab import vm
from ipvs_fleet.lab.fleet import Fleet, FleetHost, load_fleet
from ipvs_fleet.lab.image import Image, build_image, fleet_packages, seed_tar
from ipvs_fleet.resources import data_path, workdir

# What a lab image is made for: release, build tools, extra packages (the fleet file's).
ImageKind = tuple[str, bool, tuple[str, ...]]

INVENTORY = data_path("inventory/lab.py")
STATE_VERSION = 1


def default_labdir() -> Path:
    return Path(os.environ.get("IPVS_FLEET_LAB_DIR", workdir() / ".lab")).absolute()


def _stderr(msg: str) -> None:
    print(f"[lab] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class LabHost:
    """A host of a running lab, as recorded in state.json."""

    name: str
    release: str  # Debian codename
    kernel_release: str  # what `uname -r` reports in the VM
    kernel_version: str  # Debian package version of that kernel
    host_class: str
    groups: list[str]
    port: int  # SSH on 127.0.0.1
    memory_mb: int = 1024
    lan_address: str = ""  # on eth1, the lab's own Ethernet segment ("" = no such NIC)

    @property
    def line(self) -> str:
        """The kernel line, e.g. "6.1"."""
        return ".".join(self.kernel_release.split(".")[:2])


@dataclass(frozen=True)
class RunResult:
    host: str
    cmd: str
    rc: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.rc == 0


@dataclass(frozen=True)
class HostStatus:
    name: str
    state: str  # running | died (in the lab's state, but its QEMU is gone)
    ssh_ok: bool | None  # None when not running
    port: int | None
    kernel_release: str | None = None
    console: Path | None = None


@dataclass
class _State:
    hosts: dict[str, LabHost] = field(default_factory=dict)
    fleet_file: str = ""
    groups: list[str] = field(default_factory=list)  # every inventory group, even if empty


class Lab:
    """One lab instance, living in its own lab dir (several may run at once)."""

    def __init__(
        self,
        labdir: Path | str | None = None,
        fleet_file: Path | None = None,
        log: Callable[[str], None] = _stderr,
    ) -> None:
        self.dir = Path(labdir).absolute() if labdir else default_labdir()
        self.fleet_file = fleet_file
        self.log = log

    # -- files ------------------------------------------------------------------------------

    @property
    def state_path(self) -> Path:
        return self.dir / "state.json"

    @property
    def ssh_config(self) -> Path:
        return self.dir / "ssh_config"

    @property
    def known_hosts(self) -> Path:
        return self.dir / "ssh" / "known_hosts"

    @property
    def client_key(self) -> Path:
        return self.dir / "ssh" / "id_ed25519"

    @property
    def inventory_path(self) -> Path:
        """The pyinfra inventory; set IPVS_FLEET_LAB_DIR to this lab's dir when using it."""
        return INVENTORY

    def host_key(self, name: str) -> Path:
        return self.dir / "ssh" / "hosts" / name / "ssh_host_ed25519_key"

    def vm_files(self, name: str) -> vm.VmFiles:
        return vm.VmFiles(self.dir / "vms" / name)

    def _control_dir(self) -> Path:
        # A unix socket path must stay under 108 bytes; deep lab dirs use /tmp instead.
        d = self.dir / "cm"
        if len(str(d)) > 60:
            tag = hashlib.sha256(str(self.dir).encode()).hexdigest()[:12]
            d = Path(tempfile.gettempdir()) / f"ipvs-fleet-cm-{tag}"
        return d

    # -- state ------------------------------------------------------------------------------

    def _load(self) -> _State:
        try:
            data = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return _State()
        except ValueError as e:
            raise FleetError(f"{self.state_path}: corrupt lab state: {e}") from e
        hosts = {n: LabHost(**h) for n, h in data.get("hosts", {}).items()}
        return _State(hosts, data.get("fleet_file", ""), data.get("groups", []))

    def _save(self, st: _State) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        data = {
            "version": STATE_VERSION,
            "labdir": str(self.dir),
            "fleet_file": st.fleet_file,
            "groups": st.groups,
            "ssh_config": str(self.ssh_config),
            "known_hosts": str(self.known_hosts),
            "client_key": str(self.client_key),
            "hosts": {n: asdict(h) for n, h in sorted(st.hosts.items())},
        }
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(self.state_path)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with (self.dir / ".lock").open("w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    @property
    def hosts(self) -> dict[str, LabHost]:
        """The lab's hosts (name -> LabHost), as last brought up."""
        return self._load().hosts

    @property
    def groups(self) -> dict[str, list[str]]:
        """Inventory groups (group -> host names); every class group, even an empty one."""
        st = self._load()
        out: dict[str, list[str]] = {g: [] for g in st.groups}
        for name, h in sorted(st.hosts.items()):
            for g in h.groups:
                out.setdefault(g, []).append(name)
        return out

    def is_running(self, name: str) -> bool:
        return vm.pid_of(self.vm_files(name)) is not None

    # -- up / down / status -----------------------------------------------------------------

    def up(self, hosts: Sequence[str] | None = None, timeout: float | None = None) -> None:
        """Boot the fleet's hosts (all, or the named ones) unless running; wait for SSH.

        + hosts: names from the fleet file (default: all)
        + timeout: seconds from starting the VMs until SSH must answer
          (default $IPVS_FLEET_BOOT_TIMEOUT or 420; image builds do not count)
        """
        fleet = load_fleet(self.fleet_file)  # validated before anything starts
        names = list(hosts) if hosts else list(fleet.hosts)
        unknown = [n for n in names if n not in fleet.hosts]
        if unknown:
            raise ConfigError(
                f"{fleet.path}: hosts: no host named {', '.join(unknown)} "
                f"(known: {', '.join(fleet.hosts)})"
            )
        timeout = timeout or float(os.environ.get("IPVS_FLEET_BOOT_TIMEOUT", "420"))
        t0 = time.monotonic()
        with self._locked():
            st = self._load()
            running = [n for n in names if n in st.hosts and self.is_running(n)]
            self._check_same_hosts(fleet, st, running)
            todo = [n for n in names if n not in running]
            if not todo:
                self.log(f"lab {self.dir} is up: {', '.join(names)}")
                return
            self._ensure_keys(todo)
            images = self._images(fleet, todo)
            accel = vm.accel(next(iter(images.values())))
            st.fleet_file = str(fleet.path)
            st.groups = fleet.all_groups()
            authorized = (self.client_key.with_suffix(".pub")).read_text()
            boot = time.monotonic()
            for name in todo:
                spec = fleet.hosts[name]
                image = images[(spec.release, spec.build_tools, spec.packages)]
                files = self.vm_files(name)
                if name in st.hosts:  # it died: drop its pidfile and its SSH master
                    self._close_master(name)
                vm.stop(files)
                files.dir.mkdir(parents=True, exist_ok=True)
                seed_tar(files.seed, authorized, self.host_key(name), name)
                port = vm.free_port()
                lan = vm.lan_segment(self.dir) if spec.lan_address else ""
                vm.start(name, image, files, port, spec.memory_mb, accel, spec.kernel_args, lan)
                self.log(f"{name}: started ({spec.release}, {accel}, ssh port {port})")
                st.hosts[name] = LabHost(
                    name=name,
                    release=spec.release,
                    kernel_release=image.pin.kernel_release,
                    kernel_version=image.pin.version,
                    host_class=spec.host_class,
                    groups=list(spec.groups),
                    port=port,
                    memory_mb=spec.memory_mb,
                    lan_address=spec.lan_address,
                )
                self._save(st)
            self._write_ssh_files(st)
            waiting = set(todo)

            def progress() -> str:
                return f"waiting for SSH: {', '.join(sorted(waiting))}" if waiting else ""

            def wait(name: str) -> None:
                self._wait_ssh(st.hosts[name], boot + timeout)
                waiting.discard(name)

            with self._ticker(progress), ThreadPoolExecutor(len(todo)) as pool:
                list(pool.map(wait, todo))
            ready = [n for n in todo if fleet.hosts[n].lan_address or fleet.hosts[n].provision]
            if ready:
                lans = {n: h.lan_address for n, h in fleet.hosts.items() if h.lan_address}
                with ThreadPoolExecutor(len(ready)) as pool:
                    list(pool.map(lambda n: self._provision(fleet.hosts[n], lans), ready))
        self.log(f"lab up: {', '.join(names)} reachable in {time.monotonic() - t0:.0f} s")

    def _check_same_hosts(self, fleet: Fleet, st: _State, running: Sequence[str]) -> None:
        """Refuse a fleet file whose hosts differ from the running ones of the same name:
        `up` would otherwise call the lab up while its VMs boot another release or class
        (e.g. `lab up` after `make demo`, whose fleet is lab/fleet-demo.yml)."""
        differ = []
        for n in running:
            h, spec = st.hosts[n], fleet.hosts[n]
            if (h.release, h.host_class, tuple(h.groups)) != (
                spec.release,
                spec.host_class,
                spec.groups,
            ):
                differ.append(
                    f"{n} runs {h.release} as {h.host_class} (groups {', '.join(h.groups)}), "
                    f"the file wants {spec.release} as {spec.host_class} "
                    f"(groups {', '.join(spec.groups)})"
                )
        if differ:
            was = st.fleet_file or "another fleet file"
            raise ConfigError(
                f"lab {self.dir} runs other hosts than {fleet.path} describes: "
                f"{'; '.join(differ)}. It was booted from {was}: stop it first "
                f"(ipvs-fleet lab down), or use that fleet file (IPVS_FLEET_FLEET or --fleet)"
            )

    def down(self, keep: Collection[str] = ()) -> list[str]:
        """Stop the VMs this lab started (by their pidfiles), except `keep`; return their names."""
        stopped = []
        with self._locked():
            st = self._load()
            vms = self.dir / "vms"
            names = set(st.hosts) | ({p.name for p in vms.iterdir()} if vms.is_dir() else set())
            for name in sorted(names - set(keep)):
                if name in st.hosts:
                    self._close_master(name)
                if vm.stop(self.vm_files(name)):
                    stopped.append(name)
                    self.log(f"{name}: stopped")
                st.hosts.pop(name, None)
            self._save(st)
        return stopped

    def status(self, check_ssh: bool = True) -> list[HostStatus]:
        """Each host of the lab: running or died (its QEMU is gone), and whether SSH works."""
        st = self._load()
        out = []
        for name, h in sorted(st.hosts.items()):
            files = self.vm_files(name)
            if self.is_running(name):
                ok = None
                if check_ssh:
                    ok = self._probe(name, "true").ok
                out.append(HostStatus(name, "running", ok, h.port, h.kernel_release, files.console))
            else:
                out.append(HostStatus(name, "died", None, h.port, h.kernel_release, files.console))
        return out

    # -- ssh --------------------------------------------------------------------------------

    def ssh_command(self, host: str, *args: str) -> list[str]:
        """The ssh command line reaching `host` (extra ssh options may go in args)."""
        return ["ssh", "-F", str(self.ssh_config), *args, "--", host]

    def run(
        self,
        host: str,
        cmd: str | Sequence[str],
        *,
        check: bool = True,
        timeout: float = 120,
        input: str | None = None,
        connect_timeout: int = 15,
        shared: bool = True,
    ) -> RunResult:
        """Run a command on a lab host over the shared SSH connection.

        + cmd: a shell command line, or an argv list (quoted for the remote shell)
        + check: raise FleetError when the command exits non-zero
        + timeout: seconds before the command is abandoned (FleetError)
        + input: text fed to the command's stdin
        + shared: use the lab's shared (ControlMaster) connection; False opens its own
        """
        if host not in self.hosts:
            raise FleetError(f"{host}: not a host of lab {self.dir} (is it up?)")
        line = cmd if isinstance(cmd, str) else shlex.join(cmd)
        opts = ["-o", f"ConnectTimeout={connect_timeout}"]
        if not shared:
            opts += ["-o", "ControlPath=none"]
        argv = [*self.ssh_command(host, *opts), line]
        # Either input or stdin, never both: pyinfra's gevent patches subprocess.run, and
        # gevent's refuses `stdin=None` next to `input` (the stdlib's accepts it).
        feed: dict[str, Any] = (
            {"input": input} if input is not None else {"stdin": subprocess.DEVNULL}
        )
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **feed)
        except subprocess.TimeoutExpired as e:
            raise FleetError(f"{host}: `{line}` timed out after {timeout:.0f} s") from e
        res = RunResult(host, line, r.returncode, r.stdout, r.stderr)
        if check and r.returncode != 0:
            raise FleetError(
                f"{host}: `{line}` failed with exit {r.returncode}: {r.stderr.strip()[-2000:]}"
            )
        return res

    def reboot(self, host: str, timeout: float = 300) -> None:
        """Reboot a lab host and wait until SSH answers from the new boot.

        QEMU boots the image's kernel directly, so the host comes back on the same kernel
        release (module changes under /lib/modules do take effect).
        """
        boot_id = "cat /proc/sys/kernel/random/boot_id"
        before = self.run(host, boot_id).stdout.strip()
        # Detached, so that the SSH session ends before the connection is torn down.
        self.run(host, "nohup sh -c 'sleep 1; systemctl reboot' >/dev/null 2>&1 &")
        self._close_master(host)
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive(self.hosts[host])
            # Own connections: a shared one made to the old boot would hang as it goes down.
            r = self._probe(host, boot_id, shared=False)
            if r.ok and r.stdout.strip() not in ("", before):
                return
            if time.monotonic() > deadline:
                raise FleetError(
                    f"{host}: not back {timeout:.0f} s after reboot; console: "
                    f"{self.vm_files(host).console}"
                )
            time.sleep(2)

    def testinfra_host(self, name: str) -> Any:
        """A pytest-testinfra Host for a lab host (openssh backend, this lab's ssh_config)."""
        import testinfra

        return testinfra.get_host(f"ssh://{name}", ssh_config=str(self.ssh_config))

    # -- internals --------------------------------------------------------------------------

    def _provision(self, spec: FleetHost, lans: dict[str, str]) -> None:
        """Bring up a host's lan NIC (persistently: a reboot keeps it), then run its
        provision script as root with LAB_HOST and LAB_LAN_<host> (every host's lan address,
        '-' as '_') in its environment; its output goes to logs/<host>-provision.log."""
        if spec.lan_address:
            network = f"[Match]\nName=eth1\n\n[Network]\nAddress={spec.lan_address}\n"
            self.run(
                spec.name,
                f"printf '{network}' > /etc/systemd/network/30-lab-lan.network && "
                f"ip link set eth1 up && ip addr replace {spec.lan_address} dev eth1",
            )
        if spec.provision is None:
            return
        env = {"LAB_HOST": spec.name} | {
            f"LAB_LAN_{n.replace('-', '_')}": a.split("/")[0] for n, a in lans.items()
        }
        line = "env " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " sh -s"
        t0 = time.monotonic()
        r = self.run(spec.name, line, check=False, timeout=600, input=spec.provision.read_text())
        log = self.dir / "logs" / f"{spec.name}-provision.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(r.stdout + r.stderr)
        if not r.ok:
            raise FleetError(
                f"{spec.name}: provision script {spec.provision} failed with exit {r.rc} "
                f"(log: {log}): {r.stderr.strip()[-1000:]}"
            )
        self.log(f"{spec.name}: provisioned ({spec.provision.name}, {time.monotonic() - t0:.0f} s)")

    def _ensure_keys(self, names: Sequence[str]) -> None:
        """The lab's client key and each host's SSH host key, made once per lab dir."""
        for key, comment in [(self.client_key, "ipvs-fleet-lab")] + [
            (self.host_key(n), n) for n in names
        ]:
            if key.exists():
                continue
            key.parent.mkdir(parents=True, exist_ok=True)
            key.parent.chmod(0o700)
            r = subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(key)],
                capture_output=True,
                text=True,
            )
            if r.returncode != 0:
                raise FleetError(f"ssh-keygen {key} failed: {r.stderr.strip()}")

    def _images(self, fleet: Fleet, names: Sequence[str]) -> dict[ImageKind, Image]:
        """The image of each (release, build_tools, packages) the named hosts boot, built in
        parallel."""
        kinds = sorted(
            {(h.release, h.build_tools, h.packages) for h in (fleet.hosts[n] for n in names)}
        )
        logs = self.dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)

        def label(kind: ImageKind) -> str:
            return kind[0] + ("-build" if kind[1] else "") + "".join(f"+{p}" for p in kind[2])

        pending = set(kinds)
        for k in kinds:
            (logs / f"image-{label(k)}.log").unlink(missing_ok=True)  # progress shows this build's

        def one(kind: ImageKind) -> Image:
            img = build_image(
                kind[0],
                fleet_packages(kind[2]),
                build_tools=kind[1],
                log=self.log,
                logfile=logs / f"image-{label(kind)}.log",
            )
            pending.discard(kind)
            return img

        def progress() -> str:
            return "; ".join(
                f"{label(k)}: {_last_line(logs / f'image-{label(k)}.log') or 'resolving kernel'}"
                for k in sorted(pending)
            )

        # mmdebstrap waits on the network and dpkg, so builds overlap well even on 2 cores.
        with self._ticker(progress), ThreadPoolExecutor(len(kinds)) as pool:
            return dict(zip(kinds, pool.map(one, kinds), strict=True))

    @contextmanager
    def _ticker(self, what: Callable[[], str], every: float = 20.0) -> Iterator[None]:
        """Log `what()` every few seconds while a long step runs."""
        stop = threading.Event()
        t0 = time.monotonic()

        def tick() -> None:
            while not stop.wait(every):
                msg = what()
                if msg:
                    self.log(f"[{time.monotonic() - t0:.0f} s] {msg}")

        t = threading.Thread(target=tick, daemon=True)
        t.start()
        try:
            yield
        finally:
            stop.set()
            t.join()

    def _write_ssh_files(self, st: _State) -> None:
        cm = self._control_dir()
        cm.mkdir(parents=True, exist_ok=True)
        cm.chmod(0o700)
        lines = ["# Written by `ipvs-fleet lab up`; regenerated on every up.", ""]
        known = []
        for name, h in sorted(st.hosts.items()):
            lines += [
                f"Host {name}",
                "  HostName 127.0.0.1",
                f"  Port {h.port}",
                "  User root",
                f"  IdentityFile {self.client_key}",
                "  IdentitiesOnly yes",
                f"  UserKnownHostsFile {self.known_hosts}",
                "  GlobalKnownHostsFile /dev/null",
                "  StrictHostKeyChecking yes",
                "  BatchMode yes",
                "  ControlMaster auto",
                f"  ControlPath {cm}/%n",
                "  ControlPersist 300",
                "  ServerAliveInterval 5",
                "  ServerAliveCountMax 6",
                "  LogLevel ERROR",
                "",
            ]
            pub = self.host_key(name).with_name("ssh_host_ed25519_key.pub").read_text().split()
            known.append(f"[127.0.0.1]:{h.port} {pub[0]} {pub[1]}")
        self.ssh_config.write_text("\n".join(lines))
        self.known_hosts.write_text("\n".join(known) + "\n")

    def _check_alive(self, h: LabHost) -> None:
        if not self.is_running(h.name):
            raise FleetError(
                f"{h.name}: the VM died; console log: {self.vm_files(h.name).console}"
                f"{_tail(self.vm_files(h.name).console)}"
            )

    def _wait_ssh(self, h: LabHost, deadline: float) -> None:
        while True:
            self._check_alive(h)
            r = self._probe(h.name, "uname -r")
            if r.ok:
                got = r.stdout.strip()
                if got != h.kernel_release:
                    raise FleetError(f"{h.name}: booted kernel {got}, expected {h.kernel_release}")
                self.log(f"{h.name}: ssh ok, kernel {got}")
                return
            if time.monotonic() > deadline:
                console = self.vm_files(h.name).console
                raise FleetError(
                    f"{h.name}: no SSH on port {h.port} before the deadline "
                    f"(last: {r.stderr.strip()[-200:]}); console log: {console}{_tail(console)}"
                )
            time.sleep(2)

    def _probe(self, host: str, cmd: str, shared: bool = True) -> RunResult:
        """Run a quick command; a hung connection (a VM booting or going down) is a failure."""
        try:
            return self.run(host, cmd, check=False, timeout=30, connect_timeout=5, shared=shared)
        except FleetError as e:
            return RunResult(host, cmd, 255, "", str(e))

    def _close_master(self, name: str) -> None:
        subprocess.run(
            self.ssh_command(name, "-O", "exit"),
            capture_output=True,
            timeout=10,
            stdin=subprocess.DEVNULL,
        )


def _last_line(path: Path) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 400))
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1][:100] if lines else ""


def _tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return ""
    return "\n  last console lines:\n    " + "\n    ".join(lines) if lines else ""


def hosts_for_testinfra(labdir: Path | str | None = None) -> tuple[list[str], Path]:
    """Host specs and ssh_config for pytest-testinfra (`--hosts`, `--ssh-config`).

    Not named `testinfra_hosts`: testinfra reads a test module's variable of that name, and
    pytest collects functions named test*.

    >>> hosts, cfg = hosts_for_testinfra()
    >>> testinfra.get_host(hosts[0], ssh_config=str(cfg))
    """
    lab = Lab(labdir)
    # a lab_only host (clients, real servers) has no class: no fleet check applies to it
    return [f"ssh://{n}" for n, h in lab.hosts.items() if h.host_class], lab.ssh_config
