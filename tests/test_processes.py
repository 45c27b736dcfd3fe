"""A process we start, we stop: `cancel` on real local workers (submitit's LocalExecutor,
whose job code ignores SIGTERM), a worker whose controller was killed outright.

"Nothing of the run is left" is checked two ways: every PID the run recorded (controllers
in jobs.json, workers in their heartbeats, with start times) is gone, and no process on
this machine has the run directory in its command line or environment.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import launched, need, run_launch, user_env
from hpc_infer.host.procs import identify
from hpc_infer.rundir import RunDir, read_heartbeats

pytestmark = pytest.mark.slow


def processes_of(root: Path) -> list[int]:
    """PIDs (not ours) whose command line or environment names the run directory."""
    needle, me, found = str(root).encode(), os.getpid(), []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == me:
            continue
        try:
            if needle in (proc / "cmdline").read_bytes() or needle in (proc / "environ").read_bytes():
                if identify(int(proc.name)):  # not a zombie
                    found.append(int(proc.name))
        except OSError:
            continue
    return found


def wait_for(what: str, cond, timeout: float = 900.0) -> None:
    """State-based wait; the deadline only turns a hang into a failure."""
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            pytest.fail(f"never: {what}")
        time.sleep(0.2)


def test_cancel_leaves_no_process_and_a_killed_controller_takes_its_worker(tmp_path, cpu_model):
    # each worker stops at its third engine step (a failpoint) until it is killed: both are
    # mid-run, two steps of tokens generated and none finished, whatever the machine's speed
    hold = tmp_path / "hold"
    hold.mkdir()
    run_launch(
        tmp_path,
        "cluster=local",
        "cluster.workers=2",
        "data=example_prompts",
        "sampling=greedy",
        "sampling.max_tokens=32",
        "run_name=c",
        "wait=false",
        env={"HPC_INFER_FAULT": "step:HOLD:3", "HPC_INFER_HOLD_DIR": str(hold)},
    )
    run = RunDir(tmp_path / "runs" / "c")
    wait_for("both workers held at their third step", lambda: len(list(hold.glob("held.*"))) == 2)
    wait_for("two workers running", lambda: len([b for b in read_heartbeats(run) if b["state"] == "running"]) == 2)
    # progress shows tokens as they are generated, before any record is finished, and never
    # counts them as done
    from hpc_infer.run.progress import snapshot

    wait_for("tokens shown while generating", lambda: snapshot(run).generating_tokens > 0, timeout=300)
    assert snapshot(run).output_tokens == 0
    assert not run.done_chunks()
    controllers = launched(run)[0]
    beats = {b["worker"]: b for b in read_heartbeats(run)}
    workers = {w: identify(b["pid"], b["pid_start"]) for w, b in beats.items()}
    assert all(workers.values()) and set(workers) == set(controllers)

    # a controller killed outright (OOM killer, a user's kill -9): its worker goes with it
    os.kill(int(controllers[0]), signal.SIGKILL)
    first = workers[controllers[0]]
    wait_for("the orphaned worker to end", lambda: identify(first.pid, first.start) is None, timeout=600)

    p = subprocess.run(
        ["bash", "-c", 'exec hpc-infer cancel "$1"', "x", str(run.root)],
        capture_output=True,
        text=True,
        env=user_env(),
        cwd=tmp_path,
        timeout=300,
    )
    assert p.returncode == 0 and "cancelled" in p.stdout, p.stdout + p.stderr
    assert [w for w, proc in workers.items() if identify(proc.pid, proc.start)] == []
    assert [c for c in controllers if identify(int(c))] == []
    assert processes_of(run.root) == []
    # the relaunch resumes: nothing the cancel left behind blocks it
    p = run_launch(
        tmp_path, "cluster=local", "data=example_prompts", "sampling=greedy", "sampling.max_tokens=32", "run_name=c"
    )
    assert "resuming" in p.stderr and "8 records ->" in p.stderr, p.stderr[-2000:]


def test_a_killed_servers_group_is_stopped_whole_and_nothing_else(tmp_path):
    """The replica starts its server as the leader of a process group of its own
    (procs.start_child(own_group=True)); once the server is SIGKILLed, stop_group stops what
    it started, even a grandchild that escaped to init by a double fork (no subreaper and no
    /proc tree reaches it), and nothing outside the group: a sentinel we started apart lives."""
    import psutil

    from hpc_infer.host.procs import start_child, stop_group

    pids = tmp_path / "pids"
    server = (
        "import os, sys, time\n"
        "if os.fork() == 0:\n"
        "    if os.fork() == 0:\n"  # the engine core, re-parented away from the server
        "        open(sys.argv[1], 'a').write(f'{os.getpid()}\\n'); time.sleep(600)\n"
        "    os._exit(0)\n"
        "time.sleep(600)\n"
    )
    sentinel = subprocess.Popen(["sleep", "600"])
    child = start_child(
        [os.sys.executable, "-c", server, str(pids)], dict(os.environ), tmp_path / "log", own_group=True
    )
    try:
        wait_for("the grandchild to start", lambda: pids.exists() and pids.read_text().strip(), timeout=60)
        grandchild = psutil.Process(int(pids.read_text().split()[0]))
        assert os.getpgid(grandchild.pid) == child.pid and grandchild.ppid() != child.pid
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        found = stop_group(child.pid, grace_s=5)
        assert [p.pid for p in found] == [grandchild.pid]
        wait_for("the grandchild to go", lambda: not grandchild.is_running() or grandchild.status() == "zombie", 30)
        assert sentinel.poll() is None  # not of the group: untouched
        assert stop_group(child.pid) == []  # nothing left, nothing else found
    finally:
        sentinel.kill()
        sentinel.wait()


def test_a_ray_start_that_fails_is_stopped_whole_and_started_again(tmp_path):
    """host/ray_start.py, which starts every node of a multi-node replica or sbatch script:
    Ray gives a starting node a fixed 30 s to register, and on a loaded machine `ray start`
    exits with "The current node timed out during startup" (a clean-clone CI, 2026-12-07).
    Here the first start fails that way and leaves a process behind; the runner stops the
    attempt's whole group (the leftover too), starts Ray again, and a real Ray head then
    answers with one live node. Told to stop, it stops everything it started."""
    need("ray")
    from hpc_infer.host.ports import free_port
    from hpc_infer.host.procs import alive, descendants
    from hpc_infer.serve.ray_nodes import registered

    left = tmp_path / "left.pid"
    shim = tmp_path / "ray_start.sh"  # the first call fails as a start that missed its 30 s
    shim.write_text(
        f"if [ ! -e {left} ]; then\n  sleep 600 & echo $! > {left}\n"
        '  echo "Exception: The current node timed out during startup."\n  exit 1\nfi\n'
        f'exec {os.sys.executable} -m ray.scripts.scripts start "$@"\n'
    )
    port = free_port(20000, 60000)
    code = (
        "import sys\nfrom hpc_infer.host.ray_start import run\nsys.exit(run(sys.argv[2:], command=['sh', sys.argv[1]]))"
    )
    args = ["--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=1", "--disable-usage-stats"]
    log = tmp_path / "ray.log"
    with open(log, "wb") as out:
        runner = subprocess.Popen(
            [os.sys.executable, "-c", code, str(shim), *args], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        wait_for(
            "Ray to say it started",
            lambda: "Ray runtime started." in log.read_text(errors="replace") or runner.poll() is not None,
            timeout=300,
        )
        text = log.read_text(errors="replace")
        assert runner.poll() is None and "Ray runtime started." in text, text[-3000:]
        assert "attempt 1 of 3 exited with 1 before Ray said it started; stopped 1 process(es) it left" in text
        assert identify(int(left.read_text())) is None  # the failed attempt's leftover is gone
        assert registered(f"127.0.0.1:{port}") == 1  # a real head, on the same port
        ours = descendants(runner.pid)
        assert ours, "Ray's processes run under the runner"
        runner.send_signal(signal.SIGTERM)
        assert runner.wait(timeout=180) == 128 + signal.SIGTERM
        assert [p for p in ours if alive(p)] == []
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
