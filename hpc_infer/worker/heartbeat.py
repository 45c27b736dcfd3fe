"""A worker's heartbeat: `heartbeats/W.json` written from a thread; it is the lease of every
claim the worker holds (rundir/claims.py: a claim is live while its holder's heartbeat is),
so one write a beat costs the same whatever the worker holds.

A shared file system fails in ways a local disk does not (ESTALE, EIO, a full quota): a
failed beat is logged (once per kind of error, then every minute) and retried at the next
interval, never silently dropped. While beats fail the worker is `unhealthy` and claims
no new work (worker.py): its leases will run out and others will take its chunks over.
The run counts as deleted only when a beat fails and its directory is gone, on two beats in
a row (a transient failure to see the manifest is not a deletion).

The beat carries what progress needs (run/progress.py: one estimator for launch and
status): records and output tokens of *finished* records (published chunks and finished
rows of chunks in flight), and `recent`, the last samples of those two counters with
their time, from which a rate over a recent window is computed. Standard library only.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from typing import Any

from ..host import procs
from ..rundir import RunDir, claims, clock, faults
from ..rundir.beats import seconds_ran

CARRIED = ("chunks_done", "records_done", "prompt_tokens", "output_tokens", "abandoned", "backups")

RECENT = 12  # samples kept in the beat: 12 x heartbeat_s is the window rates are measured over


class Heartbeat:
    def __init__(self, run: RunDir, owner: claims.Owner, interval_s: float, lease_s: float):
        self.run, self.owner, self.interval_s, self.lease_s = run, owner, interval_s, lease_s
        self.state: dict[str, Any] = {
            "worker": owner.worker_id,
            "host": owner.host,
            "pid": owner.pid,
            "pid_start": procs.this_process().start,  # with pid: exactly this process, for `cancel`
            "python": sys.executable,  # inside a container: the image's interpreter
            "started": clock.now(),
            "earlier_s": 0.0,  # the time earlier processes of this worker id ran (a requeued task)
            "ran_s": 0.0,  # this process's running time, on its monotonic clock (beats.seconds_ran)
            "state": "starting",
            "in_flight": {},  # chunk id -> records finished so far
            "held": [],  # the chunks whose claims are ours (alive while this file is)
            "chunks_done": 0,
            "records_done": 0,  # records of chunks this worker published
            "prompt_tokens": 0,
            "output_tokens": 0,
            "in_flight_tokens": 0,  # output tokens of finished records in chunks not yet published
            "in_flight_prompt_tokens": 0,
            "generating_tokens": 0,  # tokens of requests still generating (shown, never counted as done)
            "recent": [],  # [t, records finished, output tokens finished]: the rate window
            "running": 0,  # requests the engine is generating now (the ETA's records started)
            "finish_s": None,  # seconds until the last of them should end, estimated at finish_at
            "finish_at": None,  # (worker/finish.py; None: no estimate yet, or an HTTP engine)
            "engine_start_s": None,
            # Whether a token reached this job (never its value): `status` can tell users.
            "hf_token_present": bool(os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")),
        }
        self._carried = False  # the earlier process's beat has been read (carry_over)
        self._t0 = clock.monotonic()
        self.run_deleted = False
        self.last_ok = float("-inf")  # no beat has reached the run directory yet: unhealthy until one does
        self._errors: dict[str, float] = {}  # kind of error -> when it was last logged
        self._missing = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="hpc_infer-heartbeat")

    @property
    def healthy(self) -> bool:
        """Beats reached the run directory lately (within half a lease)."""
        return clock.monotonic() - self.last_ok < self.lease_s / 2

    def carry_over(self) -> None:
        """A requeued task keeps its worker id: the earlier process's beat is read first and
        its counters and running time carried on (GPU-hours count every segment, progress
        never goes backwards). Only a missing beat means there is none: a read that fails
        otherwise (ESTALE, EIO) raises, and `beat` writes nothing until one succeeds, since a
        beat written without it would zero the earlier counters."""
        try:
            prev = json.loads(self.run.fs.read(self.run.heartbeat_name(self.owner.worker_id)))
        except (FileNotFoundError, ValueError):  # none, or not ours to read back (replaced whole, never torn)
            prev = None
        self._carried = True
        if not isinstance(prev, dict) or (prev.get("pid"), prev.get("host")) == (self.owner.pid, self.owner.host):
            return
        for key in CARRIED:
            if isinstance(prev.get(key), int):
                self.state[key] = prev[key]
        try:
            self.state["earlier_s"] = seconds_ran(prev)
        except (TypeError, ValueError):
            pass
        self.state["segments"] = int(prev.get("segments") or 1) + 1

    def start(self, thread: bool = True) -> None:
        """The first beat, then one every interval from a thread (`thread=False`: the caller
        beats, as the protocol simulator does)."""
        try:
            self.beat()
        except OSError as e:
            self._log(e)
        if thread:
            self._thread.start()

    def update(self, **kw: Any) -> None:
        with self._lock:
            self.state.update(kw)

    def finished_counts(self) -> tuple[int, int]:
        s = self.state
        return (
            s["records_done"] + sum((s["in_flight"] or {}).values()),
            s["output_tokens"] + s.get("in_flight_tokens", 0),
        )

    def beat(self) -> None:
        if not self._carried:
            self.carry_over()
        now = clock.now()
        with self._lock:
            records, tokens = self.finished_counts()
            recent = (self.state["recent"] + [[round(now, 3), records, tokens]])[-RECENT:]
            self.state["recent"] = recent
            self.state["ran_s"] = round(clock.monotonic() - self._t0, 3)
            state = dict(self.state, in_flight=dict(self.state["in_flight"]), recent=list(recent), t=now)
        faults.point("heartbeat", self.run.root)
        data = (json.dumps(state, indent=1, sort_keys=True) + "\n").encode()
        self.run.fs.replace(self.run.heartbeat_name(self.owner.worker_id), data)
        self.last_ok = clock.monotonic()

    def _log(self, e: OSError) -> None:
        kind = f"{type(e).__name__}:{getattr(e, 'errno', '')}"
        now = clock.now()
        if now - self._errors.get(kind, 0.0) >= 60.0:
            self._errors[kind] = now
            print(
                f"[hpc_infer] worker {self.owner.worker_id}: heartbeat failed ({e}); retrying every "
                f"{self.interval_s:g}s; no new chunk is claimed while it fails",
                file=sys.stderr,
                flush=True,
            )

    def _loop(self) -> None:
        """Beat every interval. The run directory is looked at only when a beat cannot be
        written (one call fewer per beat on the metadata server than a look every time)."""
        while not self._stop.wait(self.interval_s):
            if self.tick():
                return

    def tick(self) -> bool:
        """One interval's beat; True once the run directory is gone (two failed beats with
        the directory missing)."""
        try:
            self.beat()
            self._missing = 0
            return False
        except OSError as e:
            failed = e
        try:
            gone = (self.run.fs.stat() or _Gone).nlink == 0  # the pinned folder itself was removed
        except OSError:
            gone = False
        self._missing = self._missing + 1 if gone else 0
        if self._missing >= 2:
            self.run_deleted = True  # the main loop stops at its next step
            return True
        if not gone:
            self._log(failed)
        return False

    def stop(self, final_state: str, **kw: Any) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval_s + 5)
        self.update(
            state=final_state,
            in_flight={},
            held=[],
            in_flight_tokens=0,
            in_flight_prompt_tokens=0,
            generating_tokens=0,
            finished_at=clock.now(),
            **kw,
        )
        try:
            self.beat()
        except OSError as e:
            self._log(e)


class _Gone:
    nlink = 0
