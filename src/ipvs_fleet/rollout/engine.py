"""The rollout: waves in order, each deployed, soaked, gated; halt and roll back on a failed gate.

>>> r = Rollout(waves, runner, Journal("reports/rollout/lab.jsonl"))
>>> result = r.run()
>>> result.outcome, result.states()["k8s-canary"]
('completed', 'new-verified')

Every host state change is journaled (fsync'ed) before the step that follows it, so an
interrupted rollout (Ctrl-C, the controller killed, a host gone) resumes from the journal:
verified hosts are skipped, hosts caught mid-step are deployed again (the deploy is
idempotent), and hosts of waves not yet started were never touched.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.markup import escape

from ipvs_fleet.rollout import journal as J
from ipvs_fleet.rollout.config import Wave
from ipvs_fleet.rollout.domains import DomainOrder
from ipvs_fleet.rollout.journal import Journal, JournalView
from ipvs_fleet.rollout.runner import Outcome, Progress, Runner

COMPLETED, HALTED, INTERRUPTED = "completed", "halted", "interrupted"


class UI:
    """What the rollout tells the terminal; the default says nothing."""

    def wave_start(self, wave: Wave, todo: Sequence[str], total: int) -> None: ...

    def step(self, wave: Wave, step: str, host: str = "") -> None: ...

    def host_done(self, wave: Wave, host: str, state: str, reason: str = "") -> None: ...

    def wave_end(self, wave: Wave, passed: bool, failed: Sequence[str]) -> None: ...

    def message(self, text: str) -> None: ...


@dataclass
class WaveResult:
    index: int
    spec: str
    hosts: list[str]
    skipped: list[str]  # verified by an earlier run
    failed: list[str]
    passed: bool
    max_fail_percent: float
    seconds: dict[str, float] = field(default_factory=dict)
    rolled_back: list[str] = field(default_factory=list)
    refused: str = ""  # why the wave did not start (its failure domain's VRRP state)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "spec": self.spec,
            "hosts": self.hosts,
            "skipped_verified": self.skipped,
            "failed": self.failed,
            "passed": self.passed,
            "max_fail_percent": self.max_fail_percent,
            "rolled_back": self.rolled_back,
            **({"refused": self.refused} if self.refused else {}),
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
        }


@dataclass
class RolloutResult:
    outcome: str
    waves: list[WaveResult]
    planned: list[Wave]
    hosts: dict[str, J.HostRecord]
    seconds: float
    halted_at: int | None = None

    def states(self) -> dict[str, str]:
        """Each planned host's report state: old | new-verified | rolled-back | failed-unknown."""
        out = {}
        for w in self.planned:
            for h in w.hosts:
                rec = self.hosts.get(h)
                out[h] = J.report_state(rec.state if rec else None)
        return out

    def to_dict(self) -> dict[str, Any]:
        wave_of = {h: w.index for w in self.planned for h in w.hosts}
        states = self.states()
        counts: dict[str, int] = {}
        for s in states.values():
            counts[s] = counts.get(s, 0) + 1
        return {
            "outcome": self.outcome,
            "halted_at_wave": self.halted_at,
            "seconds": round(self.seconds, 3),
            "counts": counts,
            "waves": [w.to_dict() for w in self.waves],
            "plan": [
                {"index": w.index, "spec": w.spec, "hosts": list(w.hosts)} for w in self.planned
            ],
            "hosts": {
                h: {
                    "state": states[h],
                    "wave": wave_of[h],
                    "journal_state": self.hosts[h].state if h in self.hosts else None,
                    "detail": self.hosts[h].detail if h in self.hosts else "",
                }
                for h in states
            },
        }


class Rollout:
    """Runs planned waves with a Runner, journaling each host's states."""

    def __init__(
        self,
        waves: Sequence[Wave],
        runner: Runner,
        journal: Journal,
        *,
        rollback: bool = True,
        previous: JournalView | None = None,
        ui: UI | None = None,
        inventory: str = "",
        limit: Sequence[str] = (),
        sleep: Callable[[float], None] = time.sleep,
        set_id: str = "",
        domains: DomainOrder | None = None,
    ) -> None:
        self.waves = list(waves)
        self.runner = runner
        self.journal = journal
        self.rollback_enabled = rollback
        self.records: dict[str, J.HostRecord] = dict(previous.hosts) if previous else {}
        self.resume = previous is not None and previous.runs > 0
        self.ui = ui or UI()
        self.inventory = inventory
        self.limit = list(limit)
        self.sleep = sleep
        # The artifacts this run deploys (artifact.artifacts_id): a host verified with other
        # ones by an earlier run is deployed again.
        self.set_id = set_id
        # Failure domains: before a wave that takes a member, its VRRP roles are read (the
        # backup goes first; a split brain refuses the wave).
        self.domains = domains

    # -- journal helpers -------------------------------------------------------------------

    def _set(self, hosts: Sequence[str], state: str, wave: Wave, detail: str = "") -> None:
        if not hosts:
            return
        set_id = self.set_id if state == J.VERIFIED else ""
        if detail or len(hosts) == 1:
            for h in hosts:
                self.journal.host(h, state, wave.index, detail, set_id)
        else:
            self.journal.hosts(list(hosts), state, wave.index, set_id)
        for h in hosts:
            rec = self.records.get(h)
            if rec is None:
                rec = self.records[h] = J.HostRecord(state, wave.index)
            rec.state, rec.wave, rec.detail, rec.set_id = state, wave.index, detail, set_id
            rec.history.append(state)

    def _record(self, wave: Wave, outcomes: dict[str, Outcome], ok_state: str) -> list[str]:
        """Journal each outcome (ok_state or failed, a good outcome's `note` detail as its
        detail); return the failed hosts."""
        notes = {h: str(o.details.get("note") or "") for h, o in outcomes.items() if o.ok}
        self._set([h for h, n in notes.items() if not n], ok_state, wave)
        failed = []
        for h, o in outcomes.items():
            if not o.ok:
                state = J.REFUSED if o.refused else J.FAILED
                self._set([h], state, wave, o.reason or "failed")
                failed.append(h)
                self.ui.host_done(wave, h, state, o.reason)
                continue
            if notes[h]:
                self._set([h], ok_state, wave, notes[h])
            if ok_state == J.VERIFIED:
                self.ui.host_done(wave, h, J.VERIFIED, notes[h])
        return failed

    def _progress(self, wave: Wave) -> Progress:
        def cb(host: str, step: str) -> None:
            self.ui.step(wave, step, host)

        return cb

    # -- the rollout -----------------------------------------------------------------------

    def run(self) -> RolloutResult:
        t0 = time.monotonic()
        self.journal.write(
            "start",
            inventory=self.inventory,
            resume=self.resume,
            waves=[[w.spec, list(w.hosts)] for w in self.waves],
            limit=self.limit,
            artifacts=self.set_id,
        )
        results: list[WaveResult] = []
        outcome, halted_at = COMPLETED, None
        try:
            for i in range(len(self.waves)):
                refused = self._arrange(i)
                wave = self.waves[i]
                wr = self._refused(wave, refused) if refused else self._wave(wave)
                results.append(wr)
                if not wr.passed:
                    outcome, halted_at = HALTED, wave.index
                    break
        except KeyboardInterrupt:
            self.journal.write("end", outcome=INTERRUPTED)
            raise
        self.journal.write("end", outcome=outcome, halted_at=halted_at)
        self.journal.close()
        return RolloutResult(
            outcome, results, self.waves, dict(self.records), time.monotonic() - t0, halted_at
        )

    def _arrange(self, i: int) -> list[str]:
        """Order wave i's failure domain members by their VRRP roles, read now; journal the
        roles; return why the wave must not start ([]: it may)."""
        if self.domains is None:
            return []
        self.waves, records, problems = self.domains.arrange(self.waves, i, self._verified)
        for rec in records:
            self.journal.write("domain", **rec)
            if rec.get("instead_of"):
                self.ui.message(
                    f"{self.waves[i].name}: failure domain {rec['domain']}: "
                    f"{rec['takes'][0]} (VRRP backup) before {rec['instead_of']} (master)"
                )
        return problems

    def _refused(self, wave: Wave, problems: list[str]) -> WaveResult:
        """A wave not started: its hosts untouched, the rollout halted."""
        done = [h for h in wave.hosts if self._verified(h)]
        self.ui.wave_start(wave, [h for h in wave.hosts if h not in done], len(self.waves))
        why = "; ".join(problems)
        self.ui.message(f"[red]{wave.name} refused, no host touched: {escape(why)}[/]")
        self.journal.write(
            "wave", wave=wave.index, passed=False, failed=[], skipped=done, refused=why
        )
        self.ui.wave_end(wave, False, [])
        return WaveResult(
            wave.index,
            wave.spec,
            list(wave.hosts),
            done,
            [],
            False,
            wave.max_fail_percent,
            refused=why,
        )

    def _verified(self, host: str) -> bool:
        """Verified by an earlier run with the artifacts this run deploys."""
        rec = self.records.get(host)
        if rec is None or rec.state != J.VERIFIED:
            return False
        return not self.set_id or not rec.set_id or rec.set_id == self.set_id

    def _wave(self, wave: Wave) -> WaveResult:
        done = [h for h in wave.hosts if self._verified(h)]
        todo = [h for h in wave.hosts if h not in done]
        self.ui.wave_start(wave, todo, len(self.waves))
        secs: dict[str, float] = {}
        wr = WaveResult(
            wave.index, wave.spec, list(wave.hosts), done, [], True, wave.max_fail_percent, secs
        )
        again = [h for h in todo if self._state(h) == J.VERIFIED]
        if again:
            self.ui.message(
                f"{wave.name}: {len(again)} host(s) verified with other artifacts "
                f"({self.records[again[0]].set_id}, now {self.set_id}) are deployed again"
            )
        caught = [h for h in todo if self._state(h) == J.ROLLING_BACK]
        if caught and self.rollback_enabled:
            # An earlier run failed this wave and was stopped mid-rollback: finish the
            # rollback; the wave stays failed.
            self.ui.message(
                f"{wave.name}: finishing the interrupted rollback of {len(caught)} host(s)"
            )
            wr.passed = False
            self._roll_back(wave, caught, [], wr, secs)
            self.journal.write(
                "wave",
                wave=wave.index,
                passed=False,
                failed=caught,
                skipped=done,
                resumed_rollback=caught,
            )
            self.ui.wave_end(wave, False, caught)
            wr.failed = caught
            return wr
        if not todo:
            self.ui.message(f"{wave.name}: all {len(done)} host(s) verified by an earlier run")
            self.journal.write("wave", wave=wave.index, passed=True, failed=[], skipped=done)
            self.ui.wave_end(wave, True, [])
            return wr
        t = time.monotonic()
        self._set(todo, J.DEPLOYING, wave)
        self.ui.step(wave, "deploy")
        dep = self.runner.deploy(todo, self._progress(wave))
        failed = self._record(wave, dep.hosts, J.DEPLOYED)
        secs["deploy"] = time.monotonic() - t
        deployed = [h for h in todo if h not in failed]
        if deployed and wave.soak_seconds > 0:
            self.ui.step(wave, f"soak {wave.soak_seconds:.0f} s")
            t = time.monotonic()
            self.sleep(wave.soak_seconds)
            secs["soak"] = time.monotonic() - t
        if deployed:
            t = time.monotonic()
            self._set(deployed, J.GATING, wave)
            self.ui.step(wave, "gate")
            gate = self.runner.gate(deployed, self._progress(wave))
            failed += self._record(wave, gate.hosts, J.VERIFIED)
            secs["gate"] = time.monotonic() - t
        wr.failed = failed
        wr.passed = wave.passes(len(failed))
        # A failed wave rolls back all its hosts; a passing wave only its failed ones. Never
        # a refused host: this run changed nothing there, it stays on its old state.
        back = list(wave.hosts) if not wr.passed else failed
        back = [h for h in back if self._state(h) != J.REFUSED]
        if back and self.rollback_enabled:
            self._roll_back(wave, back, failed, wr, secs)
        self.journal.write(
            "wave",
            wave=wave.index,
            passed=wr.passed,
            failed=failed,
            skipped=done,
            seconds={k: round(v, 3) for k, v in secs.items()},
        )
        self.ui.wave_end(wave, wr.passed, failed)
        return wr

    def _roll_back(
        self,
        wave: Wave,
        back: list[str],
        failed: list[str],
        wr: WaveResult,
        secs: dict[str, float],
    ) -> None:
        t = time.monotonic()
        reasons = {h: self.records[h].detail for h in failed}
        self._set(back, J.ROLLING_BACK, wave)
        self.ui.step(wave, f"rollback of {len(back)} host(s)")
        rb = self.runner.rollback(back, self._progress(wave))
        for h, o in rb.hosts.items():
            st = J.ROLLED_BACK if o.ok else J.ROLLBACK_FAILED
            prior = reasons.get(h, "")
            if o.ok:
                why = f"rolled back after: {prior}" if prior else "rolled back with its wave"
            else:
                why = f"rollback failed: {o.reason}" + (f"; after: {prior}" if prior else "")
            self._set([h], st, wave, why)
            self.ui.host_done(wave, h, st, o.reason)
            if o.ok:
                wr.rolled_back.append(h)
        secs["rollback"] = time.monotonic() - t

    def _state(self, host: str) -> str | None:
        rec = self.records.get(host)
        return rec.state if rec else None
