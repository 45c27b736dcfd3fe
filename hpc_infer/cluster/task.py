"""The callable submitit runs in each task: a checkpointable wrapper around the worker.

On SIGUSR2 (the timeout/preemption warning submitit asks Slurm for) submitit calls `checkpoint`, requeues
the task and exits; the exit unwinds the worker, which takes its attempts back and releases
its claims, so the requeued task (or any other worker) picks the chunk up again. SIGTERM
(scancel; submitit itself only logs it) is the worker's own: it stops at its next step
the same way (worker/worker.py).
"""

from __future__ import annotations

import submitit

from ..worker.worker import run_worker


class WorkerTask(submitit.helpers.Checkpointable):
    """Called with the run directory and the worker's rank among those started with it;
    `checkpoint` resubmits the same call."""

    def __call__(self, run_dir: str, rank: int = 0, of: int = 1) -> dict:
        die_with_controller()
        return run_worker(run_dir, rank=rank, of=of)


def die_with_controller() -> None:
    """A local job's controller (submitit's) is what `cancel` and the launcher know; when it
    ends, even by SIGKILL, its task must end too, not run on re-parented to init."""
    import os

    if os.environ.get("SUBMITIT_EXECUTOR") == "local":
        from ..host.procs import die_with_parent

        die_with_parent()


class DoctorTask:
    """Called with the doctor directory (index unused): `hpc-infer doctor`'s probe job."""

    def __call__(self, run_dir: str, index: int = 0) -> dict:
        from ..worker.probe import run_probe

        die_with_controller()
        return run_probe(run_dir)


class TuneTask:
    """Called with the tune directory (index unused): `hpc-infer tune`'s timing job."""

    def __call__(self, run_dir: str, index: int = 0) -> dict:
        from ..worker.tuner import run_tune

        die_with_controller()
        return run_tune(run_dir)
