import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def compose(*overrides: str):
    """The typed RunConfig that `launch` would build from these overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from hpc_infer.config import register_configs, to_run_config

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "hpc_infer" / "conf"), version_base=None):
        cfg = hydra_compose(config_name="config", overrides=list(overrides))
    return to_run_config(cfg)


BIN = Path(sys.executable).parent  # the venv's bin/, where pip put the `hpc-infer` console script
# Where the shells this test process starts record the command lines they run (doc_observer.sh)
DOC_RAN = Path(tempfile.mkdtemp(prefix="hpc_infer-doc-ran-")) / "ran"


def user_env(env: dict | None = None) -> dict:
    """The environment of a user whose PATH has the installed `hpc-infer` (and no checkout on
    sys.path); the bash it starts records what it runs (tests/doc_observer.sh)."""
    full = dict(os.environ, **(env or {}))
    full["PATH"] = f"{BIN}:{full.get('PATH', '')}"
    full.pop("PYTHONPATH", None)
    full.setdefault("BASH_ENV", str(ROOT / "tests" / "doc_observer.sh"))
    full.setdefault("HPC_INFER_DOC_RAN", str(DOC_RAN))
    return full


def run_launch(
    tmp_path: Path,
    *overrides: str,
    env: dict | None = None,
    check: bool = True,
    timeout: int = 600,
    command: str = "hpc-infer launch",
):
    """Run `hpc-infer launch` as a user would: the installed console script, in bash, from tmp_path
    (outside the checkout). `command="python -m hpc_infer.launch"` checks the module form."""
    full_env = user_env(env)
    own_root = [] if any(o.startswith("output_root=") for o in overrides) else [f"output_root={tmp_path / 'runs'}"]
    cmd = ["bash", "-c", f'exec {command} "$@"', "launch", *overrides, *own_root]
    # Files, not pipes: local workers inherit the launcher's stdout/stderr, and a pipe
    # would keep us waiting for them even when the launcher itself has returned.
    out, err = tmp_path / "launch.stdout", tmp_path / "launch.stderr"
    with open(out, "w") as fo, open(err, "w") as fe:
        rc = subprocess.run(cmd, stdout=fo, stderr=fe, env=full_env, timeout=timeout, cwd=tmp_path).returncode
    p = subprocess.CompletedProcess(cmd, rc, out.read_text(), err.read_text())
    if check and p.returncode != 0:
        raise AssertionError(f"launch failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def sh(cwd, line: str, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """One command line typed into bash in `cwd` (outside the checkout), output captured.
    A command whose children outlive it (local workers) goes through run_line instead."""
    assert not str(cwd).startswith(str(ROOT)), "run from outside the checkout"
    return subprocess.run(
        ["/bin/bash", "-c", line], cwd=cwd, env=env or user_env(), capture_output=True, text=True, timeout=timeout
    )


def run_line(cwd: Path, line: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """One command line typed into bash in `cwd` (a doc's, as written), output through files
    like run_launch: local workers inherit it and would hold a pipe open."""
    out, err = Path(cwd) / ".line.stdout", Path(cwd) / ".line.stderr"
    with open(out, "w") as fo, open(err, "w") as fe:
        rc = subprocess.run(
            ["bash", "-c", line], stdout=fo, stderr=fe, env=user_env(env), timeout=timeout, cwd=cwd
        ).returncode
    return subprocess.CompletedProcess(line, rc, out.read_text(), err.read_text())


def user_checkout(tmp_path: Path) -> Path:
    """A directory that looks like the checkout to the README's relative commands (scripts/,
    pyproject.toml, tests/ and .venv as links to this one's), so that what they write
    (runs/, the sandbox) lands under tmp_path, not in the real checkout."""
    import hashlib

    # setup.sh must find its work done (its stamp in the venv), or it would reinstall the
    # package from this directory of links and point the venv's editable install here
    digest = hashlib.sha256(
        "".join(
            f"{hashlib.sha256((ROOT / f).read_bytes()).hexdigest()}  {f}\n"
            for f in ("pyproject.toml", "scripts/setup.sh")
        ).encode()
    ).hexdigest()[:12]
    stamp = BIN.parent / f".hpc_infer-setup-{digest}"
    assert stamp.exists(), f"{stamp} missing: run `bash scripts/setup.sh` in the checkout first (scripts/test.sh does)"
    here = tmp_path / "checkout"
    here.mkdir()
    for name in ("scripts", "pyproject.toml", "tests"):
        (here / name).symlink_to(ROOT / name)
    (here / ".venv").symlink_to(BIN.parent)
    return here


def tool_shims(
    folder: Path,
    tools=("sbatch", "squeue", "scontrol", "scancel", "srun", "sacct", "bwrap", "apptainer", "singularity"),
) -> tuple[str, Path]:
    """A PATH prefix whose tools record every argv they are called with (one file per call
    in folder/calls/, NUL between words: an argument may hold newlines), then run the real
    tool: an exhaustive record of the command lines we produce, where sampling /proc
    misses short-lived processes."""
    import shutil

    calls = folder / "calls"
    calls.mkdir(parents=True, exist_ok=True)
    for tool in tools:
        real = shutil.which(tool)
        if real:
            shim = folder / tool
            shim.write_text(
                f'#!/bin/bash\nprintf "%s\\0" "$0" "$@" > "$(mktemp -p {calls} "$(date +%s%N).XXXXXX")"\n'
                f'exec {real} "$@"\n'
            )
            shim.chmod(0o755)
    return str(folder), calls


def shim_calls(calls: Path) -> list[list[str]]:
    """The recorded calls, oldest first."""
    if not calls.exists():
        return []
    return [f.read_text(errors="replace").rstrip("\0").split("\0") for f in sorted(calls.iterdir())]


def read_results(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def launched(run) -> list[list[str]]:
    """The job ids of each launch of a run, in order (rundir/jobs.py records)."""
    from hpc_infer.rundir import jobs

    return [r.job_ids for r in jobs.records(run.root) if r.kind == "workers"]


def hold_env(tmp_path: Path, where: str = "claimed@/00002") -> dict:
    """The environment of a worker that stops at a failpoint until the test releases it
    (rundir/faults.py HOLD): by default once it has finished chunks 0 and 1 (one chunk in
    flight at a time) and holds chunk 2's claim: mid-run, by state, not by timing."""
    hold = tmp_path / "hold"
    hold.mkdir(exist_ok=True)
    return {"HPC_INFER_FAULT": f"{where}:HOLD", "HPC_INFER_HOLD_DIR": str(hold)}


def wait_held(tmp_path: Path, timeout: float = 900) -> int:
    """The PID of the process holding at the failpoint, once it is there. The timeout only
    bounds a broken run; nothing waits on it in a passing one."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        held = list((tmp_path / "hold").glob("held.*"))
        if held:
            return int(held[0].name.split(".", 1)[1])
        time.sleep(0.05)
    pytest.fail("no worker reached the failpoint")


def release(tmp_path: Path) -> None:
    (tmp_path / "hold" / "release").touch()


def preempt_then_finish(run, tmp_path: Path, timeout: float) -> None:
    """With the run's one Slurm task holding chunk 2's claim (hold_env), send it the
    preemption warning (submitit's USR2, as `--signal=USR2@90` would); once the task has
    gone, let the failpoint go: the task must have requeued itself, the requeued task
    finish the run, and the merge keep all 16 records of `data=example` exactly once."""
    import time

    from hpc_infer.host.procs import identify
    from hpc_infer.rundir import read_json

    pid = wait_held(tmp_path)
    held = identify(pid)
    assert run.done_chunks() == {0, 1} and 2 in run.claimed_chunks()
    (job_id,) = launched(run)[0]
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    deadline = time.time() + timeout
    while held and identify(pid, held.start) and time.time() < deadline:
        time.sleep(0.2)
    release(tmp_path)  # the requeued task passes the same point
    n_chunks = read_json(run.manifest)["n_chunks"]
    deadline = time.time() + timeout
    while len(run.done_chunks()) < n_chunks and time.time() < deadline:
        time.sleep(1)
    log = "".join(p.read_text(errors="replace") for p in run.logs.glob(f"{job_id}_0_log.*"))
    queue = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T"], capture_output=True, text=True).stdout
    assert "requeue" in log.lower(), log[-3000:]
    assert len(run.done_chunks()) == n_chunks, f"requeued task did not finish: {queue}\n{log[-3000:]}"
    m = subprocess.run([str(BIN / "hpc-infer"), "merge", str(run.root)], capture_output=True, text=True)
    assert m.returncode == 0, m.stderr
    rows = read_results(run.results())
    assert [r["index"] for r in rows] == list(range(16)) and len({r["id"] for r in rows}) == 16


@pytest.fixture(scope="session")
def cpu_model() -> str:
    from hpc_infer.models.cpu_model import ensure_smollm2

    return str(ensure_smollm2())


def slurm_available() -> bool:
    if not shutil.which("sinfo"):
        return False
    p = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
    # nodes still completing a job that was just cancelled ("comp") are up as well
    return p.returncode == 0 and any(s in p.stdout for s in ("idle", "mix", "alloc", "comp"))


def skip_or_fail(why: str) -> None:
    """Skip where the machine cannot run a test; in CI (HPC_INFER_REQUIRE_SLURM=1: root, every
    package installed) the same reason is a failure, never a quiet skip."""
    if os.environ.get("HPC_INFER_REQUIRE_SLURM") == "1":
        pytest.fail(f"cannot run in CI: {why}")
    pytest.skip(why)


@pytest.fixture
def as_root():
    """Tests that make real users, mounts or ACLs: root only (CI runs as root)."""
    if os.getuid() != 0:
        skip_or_fail("needs root: makes real users, mounts, namespaces or ACLs")


def need(module: str):
    """Import `module`, or skip the test; in CI (HPC_INFER_REQUIRE_SLURM=1: everything is
    installed) a missing dependency is a failure, never a quiet skip."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        if os.environ.get("HPC_INFER_REQUIRE_SLURM") == "1":
            pytest.fail(f"{module} is missing in CI: {e}")
        pytest.skip(f"{module} is not installed")


def require_slurm() -> None:
    """Skip without a running local Slurm, except in CI (HPC_INFER_REQUIRE_SLURM=1): there a
    missing Slurm fails the test instead of hiding it."""
    if not slurm_available():
        if os.environ.get("HPC_INFER_REQUIRE_SLURM"):
            pytest.fail("Slurm is not running: start it with slurm/local-cluster.sh")
        pytest.skip("no local Slurm (start it with slurm/local-cluster.sh, as root)")


@pytest.fixture
def slurm():
    require_slurm()
    return True


@pytest.fixture(autouse=True)
def _restore_umask():
    """In-process launches apply the run's permissions (a umask) to this process; keep each test's own."""
    import hpc_infer.rundir.files as rundir

    mask = os.umask(0o022)
    os.umask(mask)
    saved = rundir._UMASK
    yield
    os.umask(mask)
    rundir._UMASK = saved


# --- the order files run in ------------------------------------------------------------------
# scripts/test.sh runs the suite on two xdist workers, a file at a time each (--dist loadfile:
# a module's shared serve run or engine is built once). The longest files go first, a
# vLLM-bound one beside a Slurm-timer-bound one, so that the two workers end together and
# rarely both hold an engine on these 2-core machines. Measured per-file times: README.
LONGEST_FIRST = (
    "test_serve.py",
    "test_lifecycle.py",
    "test_vllm_runs.py",
    "test_slurm.py",
    "test_math_flow.py",
    "test_container_runs.py",
)


def pytest_collection_modifyitems(config, items):
    if "doors_full" not in (config.option.markexpr or ""):  # the whole door matrix: only when asked
        kept = [i for i in items if i.get_closest_marker("doors_full") is None]
        if len(kept) != len(items):
            config.hook.pytest_deselected(items=[i for i in items if i not in kept])
            items[:] = kept
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


# --- the suite's cost: time per file, the slowest tests, engine starts (issue: CI within budget) --
_TEST_SECONDS: dict[str, float] = {}
ENGINE_LINE = b"Initializing a V1 LLM engine"  # vLLM logs it once per engine it builds (LLM or server)
_LOG_SUFFIXES = (".log", ".err", ".out", ".stderr", ".stdout")


def _engine_starts(basetemp: Path) -> dict[str, int]:
    """Engines built by each test's processes, counted from vLLM's own line in the logs the
    test's runs wrote under its tmp dir (named after the test; under xdist, below the
    worker's popen-gwN). Engines built inside the pytest process itself log to pytest's
    capture and are not counted."""
    counts: dict[str, int] = {}
    for f in basetemp.rglob("*"):
        try:
            if f.suffix in _LOG_SUFFIXES and f.is_file() and f.stat().st_size < 64 << 20:
                n = f.read_bytes().count(ENGINE_LINE)
                if n:
                    parts = f.relative_to(basetemp).parts
                    top = parts[1] if parts[0].startswith("popen-gw") and len(parts) > 1 else parts[0]
                    counts[top] = counts.get(top, 0) + n
        except OSError:
            continue
    return counts


def pytest_terminal_summary(terminalreporter, config):
    tally = getattr(config, "_hpc_infer_doc_tally", None)
    if tally:
        terminalreporter.write_sep(
            "-", "doc commands observed running in passing tests: %d of %d (%d said not run here)" % tally
        )
    unobserved = getattr(config, "_hpc_infer_unobserved", None)
    if unobserved:
        terminalreporter.write_sep(
            "=",
            "doc commands no passing test ran (run them with doc_commands.as_written, "
            "or say why in test_doc_claims.COMMANDS_NOT_HERE and the doc)",
            red=True,
        )
        for cmd in unobserved:
            asked = (
                "  (a passing test asked for it, but no shell it started ran the line)" if cmd in _ASKED_ONLY else ""
            )
            terminalreporter.write_line(f"  {cmd}{asked}")
    if not _TEST_SECONDS:
        return
    per_file: dict[str, float] = {}
    for nodeid, s in _TEST_SECONDS.items():
        path = nodeid.split("::", 1)[0]
        per_file[path] = per_file.get(path, 0.0) + s
    terminalreporter.write_sep("-", "time per test file (setup + call + teardown)")
    for path, s in sorted(per_file.items(), key=lambda kv: -kv[1]):
        terminalreporter.write_line(f"{s:8.1f} s  {path}")
    terminalreporter.write_sep("-", "slowest tests")
    for nodeid, s in sorted(_TEST_SECONDS.items(), key=lambda kv: -kv[1])[:30]:
        terminalreporter.write_line(f"{s:8.1f} s  {nodeid}")
    try:
        basetemp = config._tmp_path_factory.getbasetemp()
    except Exception:  # no test asked for a tmp dir
        return
    starts = _engine_starts(Path(basetemp))
    terminalreporter.write_sep("-", f"vLLM engine starts logged under the tests' tmp dirs: {sum(starts.values())}")
    for top, n in sorted(starts.items(), key=lambda kv: -kv[1]):
        terminalreporter.write_line(f"{n:5d}  {top}")


# --- every command a doc shows is observed running, or the session fails -----------------------
# doc_commands.as_written() records which test asked for which command (and the line it made
# of it); the bash that runs a line records it itself (tests/doc_observer.sh, to DOC_RAN). A
# command counts as run once a passing test asked for it and a shell of that test ran its
# line. The test's report carries them (user_properties travel from an xdist worker to the
# controller). At the end of a whole-suite session, any command no passing test ran (and that
# is not listed as not run here) fails the session: in the controller, which sees every
# worker's reports, never in a worker, which sees its own.
_OBSERVED: set[str] = set()
_ASKED_ONLY: set[str] = set()  # asked for by a passing test, but no shell of it ran the line
_DOC_COMMANDS, _DOC_ASKED_ONLY = "doc_commands", "doc_commands_not_run"
_RAN_FROM: dict[str, int] = {}  # test node id -> where its shells' records start in DOC_RAN


def _ran_since(offset: int) -> list[str]:
    """The command lines shells started since `offset` of DOC_RAN, as they recorded them."""
    try:
        with open(DOC_RAN, "rb") as f:
            f.seek(offset)
            raw = f.read()
    except FileNotFoundError:
        return []
    return [
        r.split(" ", 2)[2]
        for r in raw.decode(errors="replace").split("\0")
        if r.startswith("start ") and r.count(" ") >= 2
    ]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    try:
        _RAN_FROM[item.nodeid] = DOC_RAN.stat().st_size
    except FileNotFoundError:
        _RAN_FROM[item.nodeid] = 0


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if call.when == "call":
        import doc_commands

        asked = doc_commands.ASKED.pop(item.nodeid, set())
        if asked:
            ran = _ran_since(_RAN_FROM.get(item.nodeid, 0))
            done = {command for command, line in asked if any(line in r for r in ran)}
            report = outcome.get_result()
            report.user_properties.append((_DOC_COMMANDS, sorted(done)))
            report.user_properties.append((_DOC_ASKED_ONLY, sorted({c for c, _ in asked} - done)))


def _whole_suite(config) -> bool:
    return (
        not config.getoption("keyword")
        and not config.getoption("markexpr")
        and all(Path(a).resolve() == ROOT / "tests" for a in (config.args or ["tests"]))
    )


def pytest_runtest_logreport(report):
    _TEST_SECONDS[report.nodeid] = _TEST_SECONDS.get(report.nodeid, 0.0) + report.duration
    if report.when == "call" and report.passed:
        for name, commands in report.user_properties:
            if name == _DOC_COMMANDS:
                _OBSERVED.update(commands)
            elif name == _DOC_ASKED_ONLY:
                _ASKED_ONLY.update(commands)


def pytest_sessionfinish(session, exitstatus):
    if hasattr(session.config, "workerinput") or not _whole_suite(session.config) or exitstatus != 0:
        return
    import doc_commands
    from test_doc_claims import COMMANDS_NOT_HERE

    shown = set(doc_commands.shown())
    unobserved = sorted(shown - set(COMMANDS_NOT_HERE) - _OBSERVED)
    session.config._hpc_infer_doc_tally = (len(shown & _OBSERVED), len(shown), len(shown & set(COMMANDS_NOT_HERE)))
    if unobserved:
        session.config._hpc_infer_unobserved = unobserved
        session.exitstatus = 1
