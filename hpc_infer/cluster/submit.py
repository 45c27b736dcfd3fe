"""Submit workers through submitit: one small base class, one subclass per backend.

`slurm` submits ONE job array per run (several when the run needs more tasks than the
cluster's MaxArraySize); `local` starts worker processes with submitit's local
executor; `debug` runs one worker in this process. Job ids are recorded in the run's
`jobs/` folder (rundir/jobs.py: one file per submission, no lock needed) so that
`status`, `cancel` and a relaunch can find them. Every job is started with
HPC_INFER_RUN_DIR in its environment: `cancel` signals only processes that carry it.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import submitit

from ..config import ClusterConfig, time_to_minutes
from ..errors import UserError
from ..rundir.claims import pid_alive
from ..rundir import RunDir, jobs, read_heartbeats, trust
from ..secrets import exported
from .task import WorkerTask

# ENDED: gone from squeue without a submitit result (a rendered script's task, or a task that
# died before writing one); states() says it when Slurm no longer knows the job.
TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
    "FINISHED",
    "INTERRUPTED",
    "DONE",
    "ENDED",
}
LIVE = ("RUNNING", "PENDING", "CONFIGURING", "COMPLETING")  # a job the scheduler still holds
# squeue did not answer (slurmctld busy, a timeout): nothing is known, so nothing is concluded;
# a job in this state is neither ended nor dead, and every wait goes on
UNREACHABLE = "UNREACHABLE"


class Backend:
    """Submits N workers for a run; reports and cancels them by job id."""

    name = "base"

    def __init__(self, cluster: ClusterConfig, run: RunDir, python: str | None = None):
        self.cluster, self.run = cluster, run
        self.python = python

    @classmethod
    def check_reachable(cls, cluster: ClusterConfig) -> None:
        """Raise a UserError naming the cluster config when this backend cannot submit from here."""

    def submit(self, n_workers: int, task=None, indices: list[int] | None = None, kind: str = "workers") -> list[str]:
        """Start n copies of `task(run_dir, index)` for these indices (default task: the batch
        worker, `WorkerTask()(run_dir)`), recorded as `kind` in the run's jobs/ (rundir/jobs.py)."""
        raise NotImplementedError

    def cancel_one(self, job_id: str) -> str:
        """Stop one job (one array task): `serve scale` down."""
        return self.cancel([job_id])

    def wait_ended(self, job_ids: list[str], timeout_s: float) -> bool:
        """Wait until the scheduler holds none of the jobs (after a cancel); False if some
        still were after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while any(s in LIVE or s == UNREACHABLE for s in self.states(job_ids).values()):
            if time.monotonic() >= deadline:
                return False
            time.sleep(1)
        return True

    def wait_exited(self, job_ids: list[str], timeout_s: float = 120.0) -> list[str]:
        """After a complete run: the jobs still running on this machine after `timeout_s`
        (their last heartbeat, the engine's shutdown). Only local jobs are this command's own
        processes; a scheduler's jobs end on their own, on their nodes."""
        return []

    def _calls(self, indices: list[int], task=None) -> tuple:
        """map_array's arguments: a serve task gets its replica number; a batch worker its rank
        among the workers started with it (rundir/claimer.py: stripe)."""
        roots = [str(self.run.root)] * len(indices)
        if task:
            return task, roots, list(indices)
        return WorkerTask(), roots, list(range(len(indices))), [len(indices)] * len(indices)

    def _env(self):
        """What every job of the run inherits: the run directory, so `cancel` can tell the run's
        processes from any other (rundir/trust.py: process_of_run)."""
        return exported({"HPC_INFER_RUN_DIR": os.path.realpath(self.run.root)})

    def states(self, job_ids: list[str]) -> dict[str, str]:
        return {j: _result_state(self.run, j) or "UNKNOWN" for j in job_ids}

    def states_and_time_left(self, job_ids: list[str]) -> tuple[dict[str, str], dict[str, str]]:
        """`serve status`: each job's state and, where the scheduler has one, its time left."""
        return self.states(job_ids), {}

    def cancel(self, job_ids: list[str]) -> str:
        """Stop the jobs; returns what was done, for the user."""
        raise NotImplementedError

    def record(self, job_ids: list[str], kind: str = "workers", indices: list[int] | None = None) -> None:
        jobs.add(self.run.fs, self.name, kind, job_ids, indices)


def _result_state(run: RunDir, job_id: str) -> str | None:
    """submitit writes <job>_<task>_result.pkl when the task function returns or raises. Read
    as plain data, and only from a file nobody but the caller could have written
    (rundir/trust.py): a planted pickle is never run, it only leaves the state unknown."""
    path = run.logs / f"{job_id}_0_result.pkl"
    if not path.exists():
        return None
    try:
        outcome = trust.load_result_pickle(path, f"task {job_id}'s result")[0]
    except UserError:
        return None
    except Exception:
        return "FAILED"
    return "COMPLETED" if outcome == "success" else "FAILED"


class DebugBackend(Backend):
    """One worker in this process (pdb works); submit returns when it has finished."""

    name = "debug"

    def submit(self, n_workers: int, task=None, indices: list[int] | None = None, kind: str = "workers") -> list[str]:
        from ..worker.worker import run_worker

        if task is not None:
            raise UserError("cluster=debug runs one batch worker in this process; use cluster=local to serve")
        saved = dict(os.environ)  # the worker sets HF_HUB_OFFLINE etc. for itself, not for the launcher
        try:
            run_worker(self.run.root, worker_id="debug")
        finally:
            os.environ.clear()
            os.environ.update(saved)
        return []

    def cancel(self, job_ids: list[str]) -> str:
        return "the debug backend runs in the launching process: nothing to cancel"


class LocalBackend(Backend):
    """N worker processes on this machine via submitit's LocalExecutor."""

    name = "local"

    def submit(self, n_workers: int, task=None, indices: list[int] | None = None, kind: str = "workers") -> list[str]:
        indices = list(indices if indices is not None else range(n_workers))
        ex = submitit.LocalExecutor(folder=self.run.logs, python=self.python)
        ex.update_parameters(timeout_min=time_to_minutes(self.cluster.time))
        with _stdio_detached(), self._env():  # the controllers outlive this command: never hold the caller's pipes
            submitted = ex.map_array(*self._calls(indices, task))
        ids = [j.job_id for j in submitted]
        self.record(ids, kind, indices)
        return ids

    def states(self, job_ids: list[str]) -> dict[str, str]:
        out = {}
        for j in job_ids:
            done = _result_state(self.run, j)
            if done:
                out[j] = done
            else:
                out[j] = "RUNNING" if j.isdigit() and _alive(int(j)) else "FAILED"  # gone without a result
        return out

    def wait_exited(self, job_ids: list[str], timeout_s: float = 120.0) -> list[str]:
        """A complete run's workers exit on their own once nothing is left (a last heartbeat,
        the engine's shutdown, their private compile caches removed): `launch` waits for their
        controllers (each waits for its task) so that nothing of the run is alive when it
        returns; the ids still running after `timeout_s` are named, never killed."""
        deadline = time.monotonic() + timeout_s
        left = [j for j in job_ids if j.isdigit()]
        while True:
            left = [j for j in left if _alive(int(j))]
            if not left or time.monotonic() >= deadline:
                return left
            time.sleep(0.2)

    def cancel(self, job_ids: list[str], grace_s: float = 15.0) -> str:
        """Stop every process of the run: each job's controller (by its PID, checked to still
        be a submitit job), everything under it, and the workers the run's heartbeats name on
        this host (a worker whose controller died was re-parented to init). All are
        collected first, then: SIGTERM to the controllers, SIGINT to their tasks (submitit's
        job code ignores SIGTERM; SIGINT unwinds the worker, which releases its claims),
        SIGKILL to whatever is left after `grace_s`. Nothing of the run stays alive."""
        import signal

        from ..host.procs import descendants, identify, signal_all, stop_all

        self.record(job_ids, "cancelled")
        root = self.run.root
        controllers = [
            p
            for p in (
                identify(int(j))
                for j in job_ids
                if j.isdigit() and _is_submitit_job(int(j)) and trust.process_of_run(int(j), root)
            )
            if p
        ]
        tasks = [c for p in controllers for c in descendants(p.pid)]
        host = socket.gethostname()
        for beat in read_heartbeats(self.run):
            pid = beat.get("pid")
            if beat.get("host") != host or not isinstance(pid, int) or not isinstance(beat.get("pid_start"), int):
                continue  # only a heartbeat that names a start time, of a process on this host
            w = identify(pid, beat["pid_start"])
            # a heartbeat is a file: the PID it names is signalled only when that process is
            # demonstrably the run's (ours, with the run directory in its environment)
            if w and w not in tasks and trust.process_of_run(pid, root):
                tasks += [w] + [d for d in descendants(w.pid) if d not in tasks]
        # what is left of the run under init (its controller killed outright): found by the run's mark
        tasks += [
            p for p in map(identify, trust.processes_of_run(root)) if p and p not in tasks and p not in controllers
        ]
        everything = controllers + tasks
        signal_all(controllers, signal.SIGTERM)
        killed = stop_all(tasks, grace_s=grace_s, first=signal.SIGINT)
        killed += stop_all(controllers, grace_s=1.0)
        return (
            f"stopped {len(controllers)} local worker{'s' * (len(controllers) != 1)} and "
            f"{len(everything) - len(controllers)} process{'es' * (len(everything) - len(controllers) != 1)} "
            f"under them" + (f" ({len(killed)} did not stop within {grace_s:g}s and were killed)" if killed else "")
        )


def _alive(pid: int) -> bool:
    """A local job's controller is still running. This launcher started it, so once it
    exits it stays a zombie (and `kill(pid, 0)` succeeds) until reaped: reap it here, and
    count anyone else's zombie as gone."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0]:
            return False
    except ChildProcessError:
        pass  # not our child (a relaunch, `hpc-infer status`)
    if not pid_alive(pid):
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@contextlib.contextmanager
def _stdio_detached():
    """submitit's local controller inherits stdin/stdout/stderr and outlives the command that
    started it (a server, a wait=false run): with a caller reading our output through a pipe
    (`| tee`, subprocess capture), that pipe would stay open until the job ends. Start the
    controllers with /dev/null there; their jobs write to their own log files."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(fd) for fd in (0, 1, 2)]
    null = os.open(os.devnull, os.O_RDWR)
    try:
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        yield
    finally:
        for fd, old in zip((0, 1, 2), saved):
            os.dup2(old, fd)
            os.close(old)
        os.close(null)


def _is_submitit_job(pid: int) -> bool:
    """Is `pid` alive and still the submitit local job we started (not a reused PID, not a zombie)?"""
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"submitit" in f.read()
    except (OSError, IndexError):
        return False


def max_array_size() -> int:
    """MaxArraySize from the running Slurm (job array indices must stay below it)."""
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 1001
    m = re.search(r"^MaxArraySize\s*=\s*(\d+)", out, re.M)
    return int(m.group(1)) if m else 1001


def sbatch_options(extra: list[str]) -> dict[str, object]:
    """["--constraint=a100", "--exclusive"] -> submitit's additional_parameters."""
    params: dict[str, object] = {}
    for item in extra:
        key, _, value = item.lstrip("-").partition("=")
        if not key:
            raise UserError(f"cluster.sbatch_extra: '{item}' is not an sbatch option like --constraint=a100")
        params[key.replace("-", "_")] = value if value else True
    return params


class SlurmBackend(Backend):
    """One job array per run through submitit's SlurmExecutor (split at MaxArraySize)."""

    name = "slurm"

    def executor(self) -> submitit.SlurmExecutor:
        c = self.cluster
        ex = submitit.SlurmExecutor(folder=self.run.logs, python=self.python, max_num_timeout=3)
        ex.update_parameters(signal_delay_s=int(c.signal_lead_s))
        params: dict[str, object] = dict(
            job_name=f"hpc_infer:{self.run.root.name}"[:100],
            time=time_to_minutes(c.time),
            cpus_per_task=c.cpus_per_task,
            ntasks_per_node=1,  # one task per node: a multi-node replica runs ServeTask on each
            nodes=c.nodes_per_task,
            setup=list(c.setup),
            stderr_to_stdout=False,
        )
        if c.gres or c.gpus_per_task:
            params["gres"] = c.gres or f"gpu:{c.gpus_per_task}"
        for key in ("partition", "account", "qos", "mem"):
            if getattr(c, key):
                params[key] = getattr(c, key)
        if c.array_parallelism:
            params["array_parallelism"] = c.array_parallelism
        extra = sbatch_options(c.sbatch_extra)
        if extra:
            params["additional_parameters"] = extra
        ex.update_parameters(**params)
        return ex

    @classmethod
    def check_reachable(cls, cluster: ClusterConfig) -> None:
        import shutil

        where = f"cluster={cluster.name} uses the slurm backend"
        missing = [cmd for cmd in ("sbatch", "squeue", "scontrol", "srun") if shutil.which(cmd) is None]
        if missing:
            raise UserError(
                f"{where}, but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not on PATH "
                f"here: run this on the cluster's login node (or `module load slurm`), or pick "
                f"cluster=local to run on this machine. Nothing was planned or submitted."
            )
        try:
            ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            raise UserError(
                f"{where}, but `scontrol ping` did not answer in 120 s: the controller is down or "
                f"unreachable. Nothing was planned or submitted."
            ) from None
        if ping.returncode != 0 or "UP" not in ping.stdout:
            said = (ping.stdout + ping.stderr).strip().splitlines()
            raise UserError(
                f"{where}, but the Slurm controller does not answer (`scontrol ping`: "
                f"{said[-1] if said else 'no output'}): start it, or ask your admins. "
                f"Nothing was planned or submitted."
            )

    def submit(self, n_workers: int, task=None, indices: list[int] | None = None, kind: str = "workers") -> list[str]:
        indices = list(indices if indices is not None else range(n_workers))
        limit = self.cluster.max_array_size or max_array_size()
        per_array = max(1, limit - 1)  # indices run 0..MaxArraySize-1
        ex = self.executor()
        ids: list[str] = []
        try:
            with self._env():
                for first in range(0, len(indices), per_array):
                    submitted = ex.map_array(*self._calls(indices[first : first + per_array], task))
                    ids += [j.job_id for j in submitted]
        except subprocess.CalledProcessError as e:
            raise UserError(
                f"sbatch refused the job: {(e.stderr or b'').decode(errors='replace').strip()} "
                f"(check cluster.partition/account/qos/gres)"
            ) from None
        finally:
            if ids:
                self.record(ids, kind, indices[: len(ids)])
        return ids

    def submit_script(self, script: Path, n_tasks: int) -> list[str]:
        """Submit a rendered array script (multi-node models: each task one allocation with
        its own Ray cluster, which submitit's one-process-per-task model does not start)."""
        with self._env():
            p = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=120)
        if p.returncode != 0:
            raise UserError(f"sbatch refused {script}: {p.stderr.strip()} (check cluster.partition/account/qos/gres)")
        array = p.stdout.strip().split(";")[0]
        ids = [f"{array}_{i}" for i in range(n_tasks)]
        self.record(ids)
        return ids

    def queue(self, job_ids: list[str]) -> dict[str, tuple[str, str]] | None:
        """squeue's state and time left of each of the jobs it still holds, in one call;
        None when squeue did not answer (a busy slurmctld: not the same as "ended")."""
        arrays = sorted({j.split("_")[0] for j in job_ids})
        try:
            p = subprocess.run(
                ["squeue", "-h", "-r", "-j", ",".join(arrays), "-o", "%i %T %L"],
                capture_output=True,
                text=True,
                timeout=60,
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        if p.returncode != 0 and "Invalid job id" not in p.stderr:  # (gone jobs: exit 1 and that)
            return None
        return {f[0]: (f[1], f[2] if len(f) > 2 else "") for f in map(str.split, p.stdout.splitlines()) if len(f) > 1}

    def states(self, job_ids: list[str]) -> dict[str, str]:
        return self.states_and_time_left(job_ids)[0]

    def states_and_time_left(self, job_ids: list[str]) -> tuple[dict[str, str], dict[str, str]]:
        """Both from one squeue call."""
        if not job_ids:
            return {}, {}
        queue = self.queue(job_ids)
        if queue is None:  # not "ended": squeue did not say
            return {j: _result_state(self.run, j) or UNREACHABLE for j in job_ids}, {}
        states = {j: queue[j][0] if j in queue else _result_state(self.run, j) or "ENDED" for j in job_ids}
        return states, {j: left for j, (_, left) in queue.items()}

    def wait_exited(self, job_ids: list[str], timeout_s: float = 120.0) -> list[str]:
        """After a complete run: its tasks end on their own (an idle worker looks once a
        heartbeat interval whether every chunk is published, then its engine shuts down and
        its private caches go); `launch` returns once the scheduler holds none of them, or
        names those still held after `timeout_s` (never cancelled: they are finishing)."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = [j for j, s in self.states(job_ids).items() if s in LIVE]
            if not left or time.monotonic() >= deadline:
                return left
            time.sleep(1)

    def cancel(self, job_ids: list[str]) -> str:
        arrays = sorted({j.split("_")[0] for j in slurm_ids(job_ids)})
        if arrays:
            self.record(job_ids, "cancelled")
            subprocess.run(["scancel", "--", *arrays], check=False)
        return f"scancel {' '.join(arrays)}" if arrays else "no Slurm job recorded"

    def cancel_one(self, job_id: str) -> str:
        if not slurm_ids([job_id]):
            return f"not a Slurm job id: {job_id!r} (nothing cancelled)"
        self.record([job_id], "cancelled")
        subprocess.run(["scancel", "--", job_id], check=False)  # 123_4: that array task only
        return f"scancel {job_id}"


SLURM_JOB_ID = re.compile(r"[0-9]+(_[0-9]+)?(\+[0-9]+)?")  # 123, 123_4 (array task), 123+1 (het job)


def slurm_ids(job_ids: list[str]) -> list[str]:
    """The ids that are Slurm job ids by its grammar: an id read back from a job record is data;
    `--user=bob` or `-1` is never passed to scancel as an option."""
    return [j for j in job_ids if isinstance(j, str) and SLURM_JOB_ID.fullmatch(j)]


BACKENDS = {"slurm": SlurmBackend, "local": LocalBackend, "debug": DebugBackend}


def make_backend(cluster: ClusterConfig, run: RunDir, python: str | None = None) -> Backend:
    return BACKENDS[cluster.backend](cluster, run, python)


def recorded_jobs(run: RunDir) -> tuple[str | None, list[str]]:
    return jobs.backend_and_ids(run.fs)


def recorded_backend(run: RunDir) -> tuple[Backend, list[str]]:
    """The backend that submitted a run's (or a serve run's) jobs, and their ids: for status,
    cancel and stop, which have only the run directory."""
    from omegaconf import OmegaConf

    name, ids = recorded_jobs(run)
    cluster = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(ClusterConfig(name="?")), {"backend": name or "debug"})
    )
    return make_backend(cluster, run), ids


def host_python() -> str:
    return sys.executable
