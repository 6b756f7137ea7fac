"""Running the deploy, the rollback and the gate on a set of hosts, through subprocesses.

The deploy and rollback go through the pyinfra CLI (`pyinfra -y --json --limit <host> ...`),
one run per wave: pyinfra has no waves of its own (its `--serial` orders hosts at random and
its `--fail-percent` counts per operation). The gate runs the fleet checks
(`ipvs_fleet.compliance`, which include the latency probe of classes with a budget) in a child
process too, so that a hung check cannot wedge the controller and every run starts clean.

Children die with the controller (PR_SET_PDEATHSIG): a controller killed with SIGKILL leaves
no orphaned run touching hosts behind it, as a crashed controller machine would.

Secrets (`--data` of a password key, ipvs_fleet.redact) reach the pyinfra children by
environment, never argv (rollout.overlay), and every child's output is masked before it is
logged (0600 files in a 0700 dir), shown as progress or kept as a reason.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ipvs_fleet.errors import ConfigError
from ipvs_fleet.redact import mask, masked_argv, secret_values, split_secrets
from ipvs_fleet.rollout.overlay import overlaid

if TYPE_CHECKING:
    from ipvs_fleet.rollout.held import HeldConnections

PYINFRA = Path(sys.executable).with_name("pyinfra")
VERIFY_DEPLOY = Path(__file__).with_name("verify_deploy.py")
PR_SET_PDEATHSIG = 1
# pyinfra's per-host output lines: "    [host] Success", "    [host] Error: ..."
HOST_LINE = re.compile(r"^\s*\[([^\]]+)\]\s+(.*)$")
OP_LINE = re.compile(r"^--> Starting (?:operation|deploy): (.*)$")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# pyinfra's own summary of a failed operation: the line before it says why.
GENERIC_ERROR = re.compile(r"^Error: executed \d+ commands?\b")
# What the deploy says in a preview, and how a plan asks it to report refusals one host at a
# time (ipvs_fleet.deploy: operations.WILL, plan.REFUSED, plan.PREFLIGHT_ENV; not imported:
# the controller stays free of pyinfra). DOMAINS_ENV (plan.DOMAINS_ENV): the rollout plans
# failure domains itself (never two members in one wave), so a plan of all hosts at once
# is not refused for holding a pair.
WILL, REFUSED, PREFLIGHT_ENV = "will ", "refused: ", "IPVS_FLEET_PREFLIGHT"
DOMAINS_ENV = "IPVS_FLEET_DOMAINS"

Progress = Callable[[str, str], None]  # (host or "", step)


@dataclass
class Outcome:
    """One host's result of a deploy, rollback or gate."""

    ok: bool
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    # The deploy's preflight refused the host: it failed before any operation ran there.
    refused: bool = False


@dataclass
class StepResult:
    """Per-host outcomes of one step on a set of hosts, its wall time and log."""

    hosts: dict[str, Outcome]
    seconds: float
    log: str = ""

    @property
    def failed(self) -> list[str]:
        return [h for h, o in self.hosts.items() if not o.ok]


class Runner(Protocol):
    def deploy(self, hosts: Sequence[str], progress: Progress) -> StepResult: ...

    def rollback(self, hosts: Sequence[str], progress: Progress) -> StepResult: ...

    def gate(self, hosts: Sequence[str], progress: Progress) -> StepResult: ...


def require_pyinfra() -> None:
    """ConfigError unless the pyinfra CLI is beside this Python (every deploy runs it)."""
    if not PYINFRA.is_file():
        raise ConfigError(
            f"{PYINFRA}: pyinfra not found beside this Python ({sys.executable}); install "
            "ipvs-fleet with its dependencies into this environment (pip install ipvs-fleet)"
        )


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path`, readable by its owner only (a new directory is 0700)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(fd, 0o600)
        f.write(text)


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def run_child(
    cmd: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float | None = None,
    on_line: Callable[[str], None] | None = None,
    log_path: Path | None = None,
    secrets: Sequence[str] = (),
) -> tuple[int, str, str]:
    """Run a child that dies with us; stream its stderr to `on_line`; (rc, stdout, stderr).

    Every `secrets` value is *** in what it streams, logs and returns.
    """
    with subprocess.Popen(
        list(cmd),
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_die_with_parent,
    ) as proc:
        err_lines: list[str] = []
        out_chunks: list[str] = []
        assert proc.stderr is not None and proc.stdout is not None
        stdout = proc.stdout

        def read_out() -> None:
            out_chunks.append(stdout.read())

        t = threading.Thread(target=read_out, daemon=True)
        t.start()
        timer = threading.Timer(timeout, proc.kill) if timeout else None
        if timer:
            timer.start()
        for line in proc.stderr:
            err_lines.append(line)
            if on_line:
                on_line(mask(line.rstrip("\n"), secrets))
        rc = proc.wait()
        killed = bool(timer and not timer.is_alive() and rc < 0)
        if timer:
            timer.cancel()
        t.join()
    stderr = mask("".join(err_lines), secrets)
    out = mask("".join(out_chunks), secrets)
    if killed:
        stderr += f"\n(killed after the {timeout:.0f} s timeout)\n"
    if log_path:
        line = mask(" ".join(masked_argv(cmd)), secrets)
        write_private(log_path, f"$ {line}\n# exit {rc}\n{stderr}\n--- stdout ---\n{out}")
    return rc, out, stderr


def host_lines(stderr: str, hosts: Sequence[str]) -> list[tuple[str, str]]:
    """(host, message) of each pyinfra line about one of `hosts`, in order, colours removed."""
    wanted = set(hosts)
    out = []
    for line in stderr.splitlines():
        m = HOST_LINE.match(ANSI.sub("", line))
        if m and m.group(1).strip() in wanted:
            out.append((m.group(1).strip(), m.group(2).strip()))
    return out


def _host_errors(stderr: str, hosts: Sequence[str]) -> dict[str, str]:
    """The last error-looking pyinfra line of each host (pyinfra's generic "Error: executed
    N commands" only when nothing says more)."""
    out: dict[str, str] = {}
    for h, msg in host_lines(stderr, hosts):
        if re.search(r"error|fail|could not|unable|refused|timed out|no route", msg, re.I):
            if GENERIC_ERROR.match(msg) and h in out:
                continue
            out[h] = msg[:500]
    return out


@dataclass
class PlannedHost:
    """One host in a plan: what the deploy would change, or why it would not run there."""

    changes: list[str] = field(default_factory=list)
    refused: str = ""  # the preflight refused the host (nothing would be changed anywhere)
    error: str = ""  # the host could not be planned (unreachable, lost, pyinfra failed)

    @property
    def ok(self) -> bool:
        return not self.refused and not self.error


def plan_outcomes(doc: dict[str, Any], stderr: str, hosts: Sequence[str]) -> dict[str, PlannedHost]:
    """Each host's pending changes from a pyinfra dry run with change detection (no `-y`).

    The --json document says which operations would change which host (pyinfra's own
    verdict); the deploy's preview lines (`[host] will ...`) say what each change is.
    A host with changes but no preview line gets the operations' names. Refusals
    (`[host] refused: ...`, $IPVS_FLEET_PREFLIGHT=report) and hosts pyinfra failed (no
    connection, lost) are reported as such: no plan, no change claimed.
    """
    out = {h: PlannedHost() for h in hosts}
    ops: dict[str, list[str]] = {}
    for op in doc.get("plan") or []:
        name = str(op.get("name") or "").split(" | ", 1)[-1]
        for h in list(op.get("hosts_with_change") or []) + list(
            op.get("hosts_with_conditional_change") or []
        ):
            ops.setdefault(h, []).append(name)
    for h, msg in host_lines(stderr, hosts):
        if msg.startswith(WILL):
            out[h].changes.append(msg[len(WILL) :])
        elif msg.startswith(REFUSED):
            out[h].refused = msg[len(REFUSED) :]
    errors = _host_errors(stderr, hosts)
    for h, p in out.items():
        if p.refused:
            p.changes = []
        elif h in ops:
            p.changes = p.changes or ops[h]
        elif not doc:
            p.changes = []
            p.error = errors.get(h, "") or "pyinfra gave no plan: " + (_tail(stderr) or "?")
        elif h in errors:
            # Not in the plan and an error line: pyinfra failed it (connect, fact read).
            p.changes, p.error = [], errors[h]
    return out


def _tail(text: str, n: int = 6) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:])[-800:]


@dataclass
class PyinfraRunner:
    """Deploy, rollback and gate of one inventory through child processes."""

    inventory: Path
    deploy_file: str = "deploy.py"
    rollback_file: str = "deploy/rollback.py"
    rollback_data: dict[str, str] = field(default_factory=dict)
    # For every pyinfra child (deploy, rollback, verification, plan): `--data k=v` (the
    # rollback's own rollback_data win over these; secrets go by environment) and other
    # pyinfra options, e.g. ("--parallel", "10", "--sudo").
    data: dict[str, str] = field(default_factory=dict)
    pyinfra_args: tuple[str, ...] = ()
    # Host data the checks gate gets on top of the inventory's, as `--data` values: the
    # deploy's identity (`_sudo` of --sudo, the connection's ssh_*/_sudo* --data).
    gate_data: dict[str, str] = field(default_factory=dict)
    use_checks: bool = True
    check_args: tuple[str, ...] = ()
    gate_timeout: float = 900.0
    host_command_timeout: float | None = None  # pyinfra's `_timeout` for deploy and rollback
    latency_hosts: int | None = None  # probe only the first N hosts of each gate; None: all
    log_dir: Path | None = None
    env: dict[str, str] | None = None
    # Connections held on each host through its deploy, judged by the gate (gate.held_connections)
    held: HeldConnections | None = None
    _seq: int = 0

    @property
    def secrets(self) -> list[str]:
        """The secret values any child may be given, masked in all it prints."""
        return secret_values(self.data, self.rollback_data, self.gate_data)

    def _log(self, what: str) -> Path | None:
        if self.log_dir is None:
            return None
        self._seq += 1
        return self.log_dir / f"{time.strftime('%Y%m%dT%H%M%S')}-{self._seq:03d}-{what}.log"

    def pyinfra(
        self,
        deploy_file: str | Path,
        hosts: Sequence[str],
        progress: Progress,
        *,
        data: dict[str, str] | None = None,
        dry: bool = False,
        what: str = "deploy",
    ) -> tuple[StepResult, dict[str, Any]]:
        """One pyinfra CLI run limited to `hosts`: per-host outcomes and its --json document.

        `dry`: pyinfra's dry run with change detection (no `-y`: with it pyinfra detects no
        change at all), refused hosts reported one by one; the stderr is in the result's log.
        """
        cmd = [str(PYINFRA), "--json", "--dry"] if dry else [str(PYINFRA), "-y", "--json"]
        cmd += list(self.pyinfra_args)
        for h in hosts:
            cmd += ["--limit", h]
        plain, secret = split_secrets({**self.data, **(data or {})})
        for k, v in plain.items():
            cmd += ["--data", f"{k}={v}"]
        if self.host_command_timeout and not dry:
            # pyinfra reads a global argument's default from host data: every command
            cmd += ["--data", f"_timeout={int(self.host_command_timeout)}"]
        env = {**(self.env if self.env is not None else os.environ), DOMAINS_ENV: "planned"}
        if dry or what == "deploy":
            # A refused host fails alone, untouched (the others of its wave go on), and says
            # so: the wave counts it failed, its rollback leaves it alone.
            env[PREFLIGHT_ENV] = "report"
        t0 = time.monotonic()

        def on_line(line: str) -> None:
            m = OP_LINE.match(line.strip())
            if m:
                progress("", m.group(1).strip())
                return
            hm = HOST_LINE.match(line)
            if hm and hm.group(1) in hosts:
                progress(hm.group(1), hm.group(2).strip()[:80])

        with overlaid(self.inventory, secret, env) as (inventory, child_env):
            cmd += [str(inventory), str(deploy_file)]
            rc, out, err = run_child(
                cmd,
                env=child_env,
                on_line=on_line,
                log_path=self._log(what),
                secrets=self.secrets,
            )
        secs = time.monotonic() - t0
        doc: dict[str, Any] = {}
        try:
            doc = json.loads(out) if out.strip().startswith("{") else {}
        except ValueError:
            doc = {}
        results = doc.get("results") or {}
        errors = _host_errors(err, hosts)
        outcomes: dict[str, Outcome] = {}
        if not doc or (not dry and not results):
            # No per-host result (preflight refused the run, every host failed, pyinfra
            # crashed): no host of this run can count as a success.
            why = _tail(err) or f"pyinfra exited {rc} without a result"
            for h in hosts:
                outcomes[h] = Outcome(False, errors.get(h, why))
        else:
            failed = set(results.get("failed_hosts") or [])
            for h in hosts:
                if h in failed:
                    outcomes[h] = Outcome(False, errors.get(h, "pyinfra marked the host failed"))
                else:
                    outcomes[h] = Outcome(True)
        for h, msg in host_lines(err, hosts):
            if msg.startswith(REFUSED):
                outcomes[h] = Outcome(False, msg[:500], refused=True)
        return StepResult(outcomes, secs, err), doc

    def deploy(self, hosts: Sequence[str], progress: Progress) -> StepResult:
        if self.held is None:
            return self.pyinfra(self.deploy_file, hosts, progress, what="deploy")[0]
        with self.held.during(hosts, progress):
            return self.pyinfra(self.deploy_file, hosts, progress, what="deploy")[0]

    def rollback(self, hosts: Sequence[str], progress: Progress) -> StepResult:
        return self.pyinfra(
            self.rollback_file, hosts, progress, data=self.rollback_data, what="rollback"
        )[0]

    def plan(self, hosts: Sequence[str], progress: Progress) -> dict[str, PlannedHost]:
        """pyinfra's dry run of the deploy: each host's pending changes, or why it would not
        be deployed; changes nothing."""
        res, doc = self.pyinfra(self.deploy_file, hosts, progress, dry=True, what="plan")
        return plan_outcomes(doc, res.log, hosts)

    def gate(self, hosts: Sequence[str], progress: Progress) -> StepResult:
        res = self._gate(hosts, progress)
        return self.held.judge(res) if self.held is not None else res

    def _gate(self, hosts: Sequence[str], progress: Progress) -> StepResult:
        if self.use_checks and checks_available():
            return self._checks_gate(hosts, progress)
        res = self.pyinfra(VERIFY_DEPLOY, hosts, progress, what="verify")[0]
        for o in res.hosts.values():
            o.details["gate"] = "pyinfra verification"
        return res

    def _checks_gate(self, hosts: Sequence[str], progress: Progress) -> StepResult:
        progress("", f"checks on {len(hosts)} host(s)")
        fd, out = tempfile.mkstemp(prefix="ipvs-fleet-gate-", suffix=".json")
        os.close(fd)
        t0 = time.monotonic()
        try:
            with overlaid(self.inventory, self.gate_data, self.env) as (inventory, env):
                cmd = [
                    sys.executable,
                    "-m",
                    "ipvs_fleet.rollout.gate_checks",
                    "--inventory",
                    str(inventory),
                    "--limit",
                    ",".join(hosts),
                    "--out",
                    out,
                    "--",
                    *self.check_args,
                    *latency_deselect(hosts, self.latency_hosts),
                ]
                rc, _, err = run_child(
                    cmd,
                    env=env,
                    timeout=self.gate_timeout,
                    log_path=self._log("gate"),
                    secrets=self.secrets,
                )
            try:
                results = json.loads(Path(out).read_text() or "null")
            except (OSError, ValueError):
                results = None
        finally:
            Path(out).unlink(missing_ok=True)
        secs = time.monotonic() - t0
        if not isinstance(results, list):
            why = f"checks did not run (exit {rc}): {_tail(err)}"
            return StepResult({h: Outcome(False, why) for h in hosts}, secs)
        return StepResult(gate_outcomes(results, hosts), secs)


# The latency check's pytest node id (rootdir: the checks folder), parametrized by host.
LATENCY_NODE = "test_ipvs_host.py::test_latency_budget[{host}]"


def latency_deselect(hosts: Sequence[str], keep: int | None) -> list[str]:
    """pytest args that skip the latency probe on all but the first `keep` hosts.

    The probe builds its own namespaces and runs dozens of connects: cheap on one real host,
    but on many simulated hosts sharing one VM's CPU it is the gate's main cost, and one
    probe per wave already measures the (shared) kernel.
    """
    if keep is None:
        return []
    return [a for h in hosts[keep:] for a in ("--deselect", LATENCY_NODE.format(host=h))]


def gate_outcomes(results: list[dict[str, Any]], hosts: Sequence[str]) -> dict[str, Outcome]:
    """Per-host gate verdict from check results: any failed or error check fails the host,
    and a host with no result at all (never reached) fails too."""
    per: dict[str, list[dict[str, Any]]] = {h: [] for h in hosts}
    for r in results:
        if r.get("host") in per:
            per[r["host"]].append(r)
    out: dict[str, Outcome] = {}
    for h, rs in per.items():
        if not rs:
            out[h] = Outcome(False, "no check result (host not reached)")
            continue
        bad = [r for r in rs if r.get("status") in ("failed", "error")]
        probe = next(
            (r["details"]["probe"] for r in rs if (r.get("details") or {}).get("probe")), None
        )
        details: dict[str, Any] = {"gate": "checks", "checks": len(rs)}
        if probe is not None:
            details["probe"] = {k: probe.get(k) for k in ("count", "slow", "errors", "latency_ms")}
        if bad:
            msg = "; ".join(f"{r.get('check')}: {str(r.get('message', ''))[:200]}" for r in bad)
            out[h] = Outcome(False, msg, details)
        else:
            out[h] = Outcome(True, "", details)
    return out


def checks_available() -> bool:
    """Whether the CHECKS capability (runner and checks/) is installed in this checkout."""
    try:
        from ipvs_fleet.compliance import runner
    except ImportError:
        return False
    return (runner.checks_dir() / "conftest.py").is_file()
