"""Failpoints: let tests kill a process at an exact step of the run-directory protocol.

Set `HPC_INFER_FAULT=POINT[@PATH_PART]:SIGNAL[:NTH]` and the process sends itself SIGNAL
the NTH time (default 1st) it reaches POINT (on a path containing PATH_PART), e.g.
`tmp_written@/out/:KILL:2` dies between fsync and rename of its second chunk output.
Unset (always, outside tests) it costs one dict lookup. Standard library only: the
worker imports it inside the cluster's image.

SIGNAL `RAISE` raises a RuntimeError instead (a worker that fails with an exception);
`SLEEP<ms>` sleeps that long at every hit (a straggler: `step:SLEEP500`); `ERRNO_<NAME>` raises
OSError(NAME) at every hit (a shared file system failing: `heartbeat:ERRNO_ESTALE`); `HOLD` stops
there until the test lets it go: the process writes `$HPC_INFER_HOLD_DIR/held.<pid>` and
waits for `$HPC_INFER_HOLD_DIR/release` (a test then acts on a known state, e.g. a worker
that has finished two chunks and holds the third's claim, instead of racing the clock).

Points: claimed (PATH_PART: the claim file, e.g. `claimed@/00002:HOLD`), step (worker), heartbeat (each beat),
locked (a rundir.lease.Lock just acquired: `locked@.merge.lock:HOLD`),
tmp_written, renamed (a `Dir`'s replace / publish, rundir.write_atomic),
merge_tmp_written (merge, before the result's rename), record (a record going into the
engine's batch; PATH_PART is matched exactly against its id: `record@r7:KILL` is a
poison record that ends the engine's process every time it is reached), tune_setting
(`hpc-infer tune`'s process for one setting, PATH_PART `setting-K`).
"""

from __future__ import annotations

import os
import signal
import time

_hits: dict[str, int] = {}


def point(name: str, path: object = "") -> None:
    spec = os.environ.get("HPC_INFER_FAULT")
    if not spec:
        return
    where, sig, *nth = spec.split(":")
    want, _, part = where.partition("@")
    if want != name or (part and (part != str(path) if name == "record" else part not in str(path))):
        return
    if sig.startswith("SLEEP"):
        time.sleep(int(sig[5:]) / 1000)
        return
    if sig.startswith("ERRNO_"):  # a shared file system's failure, at every hit: ERRNO_ESTALE, ERRNO_EIO
        import errno

        code = getattr(errno, sig[6:])
        raise OSError(code, f"injected {sig[6:]} at {name}")
    _hits[name] = _hits.get(name, 0) + 1
    if name == "record" or _hits[name] == int(nth[0] if nth else 1):  # a poison record: every time
        if sig == "HOLD":
            hold = os.environ["HPC_INFER_HOLD_DIR"]
            open(os.path.join(hold, f"held.{os.getpid()}"), "w").close()
            while not os.path.exists(os.path.join(hold, "release")):
                time.sleep(0.05)
            return
        if sig == "RAISE":
            exc = RuntimeError(f"injected fault at {name}")
            exc.engine_died = name == "record"  # a poison record: what vLLM's EngineDeadError means
            raise exc
        signum = getattr(signal, f"SIG{sig}")
        os.kill(os.getpid(), signum)
        if callable(signal.getsignal(signum)):
            return  # handled (the worker's SIGTERM/SIGUSR2 handler): it acts at its next step
        time.sleep(30)  # the default actions never return here
