"""A hostile neighbour on a shared scratch file system, with real second users.

`mallory` (another user) pre-creates run and serve directories under a world-writable
output root, plants pickles, edits config.yaml, serve.json, heartbeats and lock links;
every door is run against it as the victim (root here, as in CI: the owner check allows
the caller or root, and root can signal and read anything, so only the rule stops it)
and must refuse, execute nothing (a canary file must not appear) and send nothing (a
listener must receive no Authorization header). `alice`, a member of the run's group,
reads a `permissions=group` run with `status` and merges it into her own folder.

The users and the group are made with useradd/groupadd and kept (tests may run again);
commands run as them through runuser. /root is not traversable for them here (the
interpreter lives under it), so their commands run in a private mount namespace that
shows them /root/.pyenv and nothing else of /root (see `as_user`).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import BIN, sh, user_env

pytestmark = pytest.mark.usefixtures("as_root")  # makes real users: root (CI: a failure, never a skip)

TOKEN = "hf_TrustProbeToken0123456789abcdefghij"
ATTACKS = {"doors": 0, "attacks": 0}  # printed at the end of the module: the note's figures


def _user(name: str, groups: str | None = None) -> int:
    if subprocess.run(["id", "-u", name], capture_output=True).returncode != 0:
        subprocess.run(
            ["useradd", "-M", "-d", f"/tmp/home-{name}", "-s", "/bin/bash"]
            + (["-G", groups] if groups else [])
            + [name],
            check=True,
        )
    Path(f"/tmp/home-{name}").mkdir(exist_ok=True)
    shutil.chown(f"/tmp/home-{name}", name, name)
    return int(subprocess.run(["id", "-u", name], capture_output=True, text=True).stdout)


@pytest.fixture(scope="module")
def users():
    if subprocess.run(["getent", "group", "team"], capture_output=True).returncode != 0:
        subprocess.run(["groupadd", "team"], check=True)
    return {"mallory": _user("mallory"), "alice": _user("alice", "team"), "bob": _user("bob", "team")}


@pytest.fixture
def scratch(users):
    """A shared scratch root like a cluster's: world-writable with the sticky bit, outside
    root's private tmp (the other users must reach it)."""
    top = Path(tempfile.mkdtemp(prefix="hpc_infer-trust-", dir="/tmp"))
    top.chmod(0o755)
    shared = top / "scratch"
    shared.mkdir()
    shared.chmod(0o1777)
    yield top
    shutil.rmtree(top, ignore_errors=True)


def as_user(user: str, line: str, cwd: Path | str = "/tmp") -> subprocess.CompletedProcess:
    """`line` in bash as `user`, with the venv's hpc-infer on PATH. The interpreter lives under
    /root (0700 here): a private mount namespace mounts an empty /root with only .pyenv in it."""
    env_line = f"export PATH={BIN}:/usr/bin:/bin HOME=/tmp/home-{user}; cd {cwd}; {line}"
    setup = (
        "d=$(mktemp -d) && mount --bind /root/.pyenv $d && mount -t tmpfs -o mode=755 tmpfs /root && "
        "mkdir /root/.pyenv && mount --move $d /root/.pyenv && rmdir $d && "
    )
    return subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            setup + f'exec runuser -u {user} -- bash -c "$0"',
            env_line,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )


def attack(doors: int = 1) -> None:
    ATTACKS["attacks"] += 1
    ATTACKS["doors"] += doors


@pytest.fixture(scope="module", autouse=True)
def _tally():
    yield
    print(
        f"\ntrust probe: {ATTACKS['attacks']} attacks through {ATTACKS['doors']} doors, each asserted to refuse, "
        f"run nothing and send no key",
        file=sys.stderr,
    )


def _uid(name: str) -> int:
    return int(subprocess.run(["id", "-u", name], capture_output=True, text=True).stdout)


def canary_payload(canary: Path) -> bytes:
    """A pickle that, loaded, creates the canary file."""

    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {canary}",))

    return pickle.dumps(("success", Boom()))


def test_the_canary_payload_fires_when_loaded(tmp_path):
    """The positive control for every `not canary.exists()` here: loading the planted pickle
    does create the canary, so a door that loaded it would fail those asserts."""
    canary = tmp_path / "canary"
    pickle.loads(canary_payload(canary))
    assert canary.exists()


class Listener:
    """An HTTP server that records every request's path and Authorization header."""

    def __init__(self, redirect_to: str | None = None):
        self.seen: list[tuple[str, str | None]] = []
        seen = self.seen

        class Handler(BaseHTTPRequestHandler):
            def _any(self):
                seen.append((self.path, self.headers.get("Authorization")))
                if redirect_to:
                    self.send_response(302)
                    self.send_header("Location", redirect_to + self.path)
                else:
                    self.send_response(200)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            do_GET = do_POST = _any

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def keys_seen(self) -> list[str]:
        return [a for _, a in self.seen if a]

    def close(self):
        self.server.shutdown()


def _plan(scratch: Path, *overrides: str) -> Path:
    """A run planned by the victim (root) with `hpc-infer sbatch` (no job runs)."""
    p = sh(scratch, f"hpc-infer sbatch cluster=slurm_local data.limit=3 {' '.join(overrides)}")
    assert p.returncode == 0, p.stderr[-2000:]
    return Path(p.stdout.strip().splitlines()[-1]).parent


def _set_hook(cfg: Path, hook: dict) -> None:
    """config.yaml edited the way an attacker (or a teammate's own config) would: a merge hook."""
    from omegaconf import OmegaConf

    c = OmegaConf.load(cfg)
    OmegaConf.update(c, "merge.postprocess", hook, force_add=True)
    cfg.write_text(OmegaConf.to_yaml(c))


def _finish(run: Path) -> None:
    from hpc_infer.rundir import RunDir, encode_chunk_output, read_chunk_records, read_json, write_atomic
    from hpc_infer.rundir.fsio import PinnedDir

    r = RunDir(run, PinnedDir(run))  # the test (root) writes into a run of another user's: no rule
    for cid in range(read_json(r.manifest)["n_chunks"]):
        rows = [
            dict(x, text="mine", outputs=[{"text": "mine"}], prompt_tokens=1, output_tokens=1)
            for x in read_chunk_records(r, cid)
        ]
        write_atomic(r.out_path(cid), encode_chunk_output(cid, rows, worker="w", started=1.0, finished=2.0))


# --- run directories -------------------------------------------------------------------------


def test_a_run_dir_someone_else_created_is_never_resumed(scratch):
    """mallory plans the predictable run name first (a copy of a real run, forged outputs
    with valid trailers, a planted pickle): the victim's launch and sbatch refuse it, name
    the fix, and nothing of mallory's is read or run."""
    canary = scratch / "canary"
    own = _plan(scratch, f"output_root={scratch}/mine", "run_name=probe")
    _finish(own)
    for f in own.rglob("*"):  # mallory's text in the forged outputs
        if f.suffix == ".jsonl" and f.parent.name == "out":
            f.write_bytes(f.read_bytes().replace(b'"mine"', b'"EVIL"'))
    (own / "logs").mkdir(exist_ok=True)
    (own / "logs" / "1_0_result.pkl").write_bytes(canary_payload(canary))
    shared = scratch / "scratch"
    shutil.copytree(own, shared / "probe")
    subprocess.run(["chown", "-R", "mallory:mallory", str(shared / "probe")], check=True)
    subprocess.run(["chmod", "-R", "a+rwX", str(shared / "probe")], check=True)
    for door in ("hpc-infer launch cluster=local wait=false", "hpc-infer sbatch cluster=slurm_local"):
        attack()
        p = sh(scratch, f"{door} data.limit=3 run_name=probe output_root={shared}")
        assert p.returncode == 2, p.stdout + p.stderr
        assert "refused" in p.stderr and "owner mallory" in p.stderr and "run_name" in p.stderr, p.stderr
    subprocess.run(["chmod", "-R", "go-w", str(shared / "probe")], check=True)  # not writable: still not ours
    attack()
    p = sh(scratch, f"hpc-infer launch cluster=local wait=false data.limit=3 run_name=probe output_root={shared}")
    assert p.returncode == 2 and "owned by mallory" in p.stderr, p.stderr
    for door in ("status", "cancel", "merge"):
        attack()
        p = sh(scratch, f"hpc-infer {door} {shared / 'probe'}")
        assert p.returncode == 2 and "mallory" in p.stderr, (door, p.stderr)
    assert not canary.exists()


def test_planted_pickle_edited_config_and_writable_folders_are_refused(scratch):
    """The victim's own run, with a folder or file left writable by others (a careless
    chmod): status, cancel and merge refuse it; a pickle mallory planted is never loaded;
    an edited config.yaml's hook never runs."""
    canary = scratch / "canary"
    run = _plan(scratch, f"output_root={scratch}/runs", "cluster.workers=1")
    _finish(run)
    run.parent.chmod(0o711)
    run.chmod(0o711)
    (run / "logs").chmod(0o777)
    p = as_user(
        "mallory",
        f"python3 -c 'import sys; open(sys.argv[1], \"wb\").write(bytes.fromhex(sys.argv[2]))' "
        f"{run}/logs/7_0_result.pkl {canary_payload(canary).hex()}",
    )
    assert p.returncode == 0, p.stderr
    for door in ("status", "cancel", "merge"):
        attack()
        p = sh(scratch, f"hpc-infer {door} {run}")
        assert p.returncode == 2 and "writable by everyone" in p.stderr, (door, p.stderr)
    (run / "logs").chmod(0o700)
    attack()  # the victim's own folder, a pickle file of mallory's in it: never unpickled
    from hpc_infer.cluster.submit import _result_state
    from hpc_infer.rundir import RunDir

    os.chown(run / "logs" / "7_0_result.pkl", 0, 0)
    assert _result_state(RunDir(run), "7") == "FAILED"  # the caller's file, not plain data: refused, not run
    assert not canary.exists()
    os.chown(run / "logs" / "7_0_result.pkl", _uid("mallory"), -1)
    assert _result_state(RunDir(run), "7") is None  # not the caller's: not read at all
    assert not canary.exists()
    cfg = run / "config.yaml"
    cfg.chmod(0o666)
    _set_hook(cfg, {"_target_": "os.system", "command": f"touch {canary}"})
    attack()
    p = sh(scratch, f"hpc-infer merge {run}")
    assert p.returncode == 2 and "writable by everyone" in p.stderr and "config.yaml" in p.stderr, p.stderr
    assert not canary.exists()


def test_a_hook_nested_in_a_hooks_arguments_is_refused(scratch):
    """Hydra's instantiate would call a `_target_` nested in the hook's arguments too (and its
    blocklist does not see it): refused at launch, naming the setting."""
    canary = scratch / "canary"
    attack()
    p = sh(
        scratch,
        f"hpc-infer sbatch cluster=slurm_local data.limit=2 output_root={scratch}/runs "
        f"'+merge.postprocess={{_target_: hpc_infer.rewards.r1_zero_reward, "
        f'answer_field: {{_target_: os.system, command: "touch {canary}"}}}}\'',
    )
    assert p.returncode == 2 and "merge.postprocess.answer_field: a _target_ inside" in p.stderr, p.stderr
    assert not canary.exists()


def test_cancel_signals_only_the_runs_own_processes(scratch):
    """A heartbeat is a file: one naming an innocent process of the caller's (PID and start
    time right) gets it no signal; only processes with the run in their environment go."""
    from hpc_infer.host.procs import identify

    run = _plan(scratch, f"output_root={scratch}/runs")
    innocent = subprocess.Popen(["sleep", "600"])
    marked = subprocess.Popen(["sleep", "600"], env=dict(os.environ, HPC_INFER_RUN_DIR=str(run)))
    try:
        beats = run / "heartbeats"
        for name, proc in (("forged", innocent), ("real", marked)):
            p = identify(proc.pid)
            (beats / f"{name}.json").write_text(
                json.dumps(
                    {
                        "worker": name,
                        "host": socket.gethostname(),
                        "pid": proc.pid,
                        "pid_start": p.start,
                        "state": "running",
                    }
                )
            )
        (run / "jobs").mkdir(exist_ok=True)
        (run / "jobs" / "0.json").write_text(
            json.dumps({"backend": "local", "kind": "workers", "time": 1, "job_ids": [str(innocent.pid)]})
        )
        attack(2)
        p = sh(scratch, f"hpc-infer cancel {run}")
        assert p.returncode == 0, p.stderr
        marked.wait(timeout=60)
        assert innocent.poll() is None, "an innocent process named by a heartbeat and jobs record was signalled"
    finally:
        innocent.kill()
        marked.kill()


# --- serve directories -----------------------------------------------------------------------


def _foreign_serve_dir(scratch: Path, listener: Listener, canary: Path, key_file: str) -> Path:
    d = scratch / "scratch" / "serve__x"
    (d / "serve").mkdir(parents=True)
    (d / "jobs").mkdir()
    (d / "serve.json").write_text(
        json.dumps(
            {
                "served_name": "m",
                "model": {"path": "/m"},
                "key_file": key_file,
                "replicas": 1,
                "python": f"sh -c 'touch {canary}'; python3",
                "cluster_config": {"name": "local", "backend": "local"},
                "backend": "local",
            }
        )
    )
    (d / "serve" / "0.json").write_text(
        json.dumps(
            {
                "replica": 0,
                "state": "ready",
                "url": f"{listener.url}/v1",
                "port": listener.port,
                "host": socket.gethostname(),
            }
        )
    )
    (d / "jobs" / "0.json").write_text(
        json.dumps({"backend": "local", "kind": "replicas", "time": 1, "job_ids": [str(os.getpid())], "indices": [0]})
    )
    subprocess.run(["chown", "-R", "mallory:mallory", str(d)], check=True)
    return d


def test_a_foreign_serve_dir_gets_no_key_and_runs_nothing(scratch):
    """mallory's serve directory names the victim's HF token file as its key file, a
    listener of hers as a ready replica and a command as its interpreter: serve status,
    metrics, scale and stop and a batch through it refuse; the listener sees no key."""
    canary = scratch / "canary"
    home_token = Path.home() / ".cache" / "huggingface" / "token"
    listener = Listener()
    try:
        d = _foreign_serve_dir(scratch, listener, canary, str(home_token))
        for door in ("serve status", "serve metrics", "serve scale", "serve stop"):
            attack()
            p = sh(
                scratch,
                f"hpc-infer {door} {d}" + (" 2" if door == "serve scale" else ""),
                env=user_env({"HF_TOKEN": TOKEN}),
            )
            if door == "serve status":  # readable as data (mallory's is world-readable): shown, never proven
                assert p.returncode == 2 or "not yours" in p.stdout, p.stdout + p.stderr
            else:
                assert p.returncode == 2 and "mallory" in p.stderr, (door, p.stdout, p.stderr)
        attack()
        p = sh(
            scratch,
            f"hpc-infer launch cluster=local data.limit=2 cluster.endpoint={d} output_root={scratch}/runs",
            env=user_env({"HF_TOKEN": TOKEN}),
        )
        assert p.returncode == 2 and "mallory" in p.stderr, p.stderr
        assert listener.keys_seen() == [] and not canary.exists()
    finally:
        listener.close()


def test_a_stale_ready_replica_gets_no_key(scratch, monkeypatch):
    """The victim's own serve run whose replica died outright (its state file still says
    ready) while a foreign server took its port: status reads it as not ready and the
    listener sees only the key-less proof request; a batch worker's URL list drops it."""
    from hpc_infer.serve import serverun
    from hpc_infer.serve.serverun import ServeRun
    from hpc_infer.serve.status import replica_states
    from hpc_infer.worker.http_engine import ready_urls

    keys = scratch / "keys"
    keys.mkdir(mode=0o700)
    monkeypatch.setattr(serverun, "KEYS_DIR", keys)
    (keys / "k.key").write_text("the-run-key")
    (keys / "k.key").chmod(0o600)
    listener = Listener()
    try:
        d = scratch / "own_serve"
        (d / "serve").mkdir(parents=True)
        d.chmod(0o700)
        (d / "serve.json").write_text(
            json.dumps(
                {"served_name": "m", "model": {"path": "/m"}, "key_file": str(keys / "k.key"), "backend": "local"}
            )
        )
        (d / "serve" / "0.json").write_text(
            json.dumps({"replica": 0, "state": "ready", "port": listener.port, "url": f"{listener.url}/v1"})
        )
        from hpc_infer.rundir import jobs

        keeper = subprocess.Popen(["sleep", "600"])  # a live "job" for the local backend
        try:
            jobs.add(d, "local", "replicas", [str(keeper.pid)], [0])
            attack(2)
            (state,) = replica_states(ServeRun.open(d, "test"))
            assert state["state"] != "ready", state
            urls, _ = ready_urls({"run": str(d), "urls": [f"{listener.url}/v1"]}, "the-run-key")
            assert urls == []
        finally:
            keeper.kill()
        assert listener.seen and all(path.startswith("/hpc_infer/proof") for path, _ in listener.seen)
        assert listener.keys_seen() == []
    finally:
        listener.close()


def test_the_key_never_follows_a_redirect(scratch):
    from hpc_infer.host.http import http

    target = Listener()
    hop = Listener(redirect_to=target.url)
    try:
        attack()
        code, _ = http(f"{hop.url}/metrics", key="the-run-key")
        assert code == 302 and target.seen == [], target.seen
    finally:
        target.close()
        hop.close()


# --- secrets before anything is written ------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        "-m '+cluster.env={MY_TOKEN: abcdefgh12345678}' seed=1,2",
        "'+cluster.env={NOTE: " + TOKEN + "}'",
        "hydra.output_subdir=.hydra '+cluster.env={DB_PASSWORD: abcdefgh12345678}'",
        "'+cluster.env.DSN=postgres://u:pw12345678@db/x'",
        "'hydra.run.dir=${oc.env:INNOCENT}'",
    ],
)
def test_secrets_in_structured_overrides_are_refused_before_hydra_writes(scratch, args):
    attack()
    p = sh(
        scratch,
        f"hpc-infer launch cluster=local data.limit=2 output_root={scratch}/runs {args}",
        env=user_env({"INNOCENT": TOKEN}),
    )
    assert p.returncode == 2 and "value not shown" in p.stderr, p.stderr
    written = b"".join(f.read_bytes() for f in scratch.rglob("*") if f.is_file())
    assert TOKEN.encode() not in written and b"abcdefgh12345678" not in written and b"pw12345678" not in written
    assert not (scratch / "runs").exists() and not list(scratch.rglob("multirun.yaml"))


def test_a_secret_from_a_config_file_names_no_directory_and_no_error_echoes_it(scratch):
    conf = scratch / "conf"
    (conf / "cluster").mkdir(parents=True)
    (conf / "cluster" / "mine.yaml").write_text("defaults: [local, _self_]\nname: mine\nworkers: ${oc.env:INNOCENT}\n")
    attack()
    p = sh(
        scratch,
        f"hpc-infer launch --config-dir {conf} cluster=mine data.limit=2 output_root={scratch}/runs",
        env=user_env({"INNOCENT": TOKEN}),
    )
    assert p.returncode == 2 and TOKEN not in p.stdout + p.stderr, p.stdout + p.stderr
    (conf / "hydra_dir.yaml").write_text("")
    (conf / "cluster" / "mine.yaml").write_text("defaults: [local, _self_]\nname: mine\n")
    attack()
    p = sh(
        scratch,
        f"hpc-infer launch --config-dir {conf} cluster=mine data.limit=2 "
        f"'output_root={scratch}/runs/${{oc.env:INNOCENT}}'",
        env=user_env({"INNOCENT": TOKEN}),
    )
    assert p.returncode == 2 and TOKEN not in p.stdout + p.stderr
    assert not any(TOKEN in str(f) for f in scratch.rglob("*"))


@pytest.mark.parametrize("path", ["/proc/self/environ", "/proc/1/environ", "/sys/kernel/hostname"])
def test_kernel_and_process_files_are_not_inputs(scratch, path):
    attack()
    p = sh(
        scratch,
        f"hpc-infer launch cluster=local data.path={path} data.format=txt output_root={scratch}/runs",
        env=user_env({"HF_TOKEN": TOKEN}),
    )
    assert p.returncode == 2 and "kernel or process file" in p.stderr, p.stderr
    assert not (scratch / "runs").exists()


@pytest.mark.parametrize(
    "yaml",
    [
        'partition: "gpu\\nrm -rf ~"',
        'sbatch_extra: ["--x=1\\ntouch c"]',
        'setup: ["module load x\\ntouch c"]',
        'env: {A: "1\\ntouch c"}',
        'env: {"A B": "1"}',
        'account: "a\\rb"',
    ],
)
def test_a_newline_never_becomes_a_script_line(scratch, yaml):
    """Hydra's command line refuses a newline itself; a cluster file is where one comes from."""
    conf = scratch / "conf" / "cluster"
    conf.mkdir(parents=True)
    (conf / "mine.yaml").write_text(f"defaults: [slurm_local, _self_]\nname: mine\n{yaml}\n")
    attack()
    p = sh(
        scratch, f"hpc-infer sbatch --config-dir {scratch}/conf cluster=mine data.limit=2 output_root={scratch}/runs"
    )
    assert p.returncode == 2, p.stdout + p.stderr
    assert "control character" in p.stderr or "environment variable name" in p.stderr, p.stderr
    assert not list(scratch.rglob("job.sbatch"))


# --- a multirun's sweep folder ----------------------------------------------------------------


def test_a_sweep_folder_someone_else_made_is_never_written(scratch):
    """mallory makes the sweep folder first, in a shared output root (`.multirun`, the
    default hydra.sweep.dir), with multirun.yaml a link to the victim's file: the victim's
    multirun is refused before Hydra writes anything, naming hydra.sweep.dir; in a sweep
    folder of the victim's own, Hydra and runs.txt write into the pinned folder."""
    victim = scratch / "victim_file"
    victim.write_text("precious")
    shared = scratch / "scratch"
    p = as_user("mallory", f"mkdir {shared}/.multirun && ln -s {victim} {shared}/.multirun/multirun.yaml")
    assert p.returncode == 0, p.stderr
    attack()
    line = f"hpc-infer launch --multirun seed=1,2 cluster=local wait=false data.limit=2 output_root={shared}"
    p = sh(scratch, line)
    assert p.returncode == 2 and "hydra.sweep.dir" in p.stderr and "mallory" in p.stderr, p.stderr
    assert victim.read_text() == "precious" and not list(shared.glob("*__*"))
    own = scratch / "own"
    fake = {"HPC_INFER_FAKE_ENGINE": json.dumps({"step_s": 0.001})}
    mine = line.replace(str(shared), str(own)).replace("wait=false", "sampling.max_tokens=2")
    p = sh(scratch, mine + " 'run_name=s${seed}'", env=user_env(fake))
    assert p.returncode == 0, p.stderr[-3000:]
    listed = (own / ".multirun" / "runs.txt").read_text().split()
    assert listed == [str(own / "s1"), str(own / "s2")] and (own / ".multirun" / "multirun.yaml").is_file()


# --- the admin cache -------------------------------------------------------------------------


def test_a_planted_lock_link_truncates_nothing(scratch, cpu_model):
    """As root, staging into a cache root others can write is refused (a link planted there
    would point root's writes anywhere); a lock link in a root of root's own is never
    followed."""
    victim = scratch / "victim_file"
    victim.write_text("precious")
    root = scratch / "scratch" / "models"
    root.mkdir()
    root.chmod(0o777)
    as_user("mallory", f"ln -s {victim} {root}/.SmolLM2-135M-Instruct.lock")
    attack()
    p = sh(scratch, f"hpc-infer cache stage {cpu_model} --root {root}")
    assert p.returncode == 2 and "writable by everyone" in p.stderr, p.stderr
    assert victim.read_text() == "precious"
    own = scratch / "own_models"
    own.mkdir()
    (own / ".SmolLM2-135M-Instruct.lock").symlink_to(victim)
    from hpc_infer.rundir.lease import Lock

    attack()
    lock = Lock(own / ".SmolLM2-135M-Instruct.lock", lease_s=0.5, poll_s=0.05)
    lock.acquire()  # the link is taken for a stale lock, renamed away, never written through
    lock.release()
    assert victim.read_text() == "precious"


# --- a teammate's group run ------------------------------------------------------------------


def test_a_group_member_reads_and_merges_a_group_run(scratch, users):
    """bob plans a permissions=group run; the whole tree has the group; alice (in it) runs
    status and merges into her own folder; she cannot write into the run; the run's hook
    (not one hpc_infer ships) is not run for her; mallory (not in it) reads nothing."""
    canary = scratch / "canary"
    runs = scratch / "runs"
    runs.mkdir()
    runs.chmod(0o777)
    p = as_user(
        "bob",
        f"hpc-infer sbatch cluster=slurm_local data.limit=3 output_root={runs} permissions=group run_group=team",
        cwd=scratch,
    )
    assert p.returncode == 0, p.stdout + p.stderr
    run = Path(p.stdout.strip().splitlines()[-1]).parent
    _finish(run)
    subprocess.run(["chown", "-R", "bob", str(run)], check=True)
    cfg = run / "config.yaml"  # bob's own hook, in bob's own config: code alice did not choose
    _set_hook(cfg, {"_target_": "os.system", "command": f"touch {canary}"})
    gid = int(subprocess.run(["getent", "group", "team"], capture_output=True, text=True).stdout.split(":")[2])
    assert all(p.stat().st_gid == gid for p in [run, *run.rglob("*")]), [
        str(p) for p in [run, *run.rglob("*")] if p.stat().st_gid != gid
    ]
    p = as_user("alice", f"hpc-infer status {run}")
    assert p.returncode == 0 and "chunks" in p.stdout, p.stdout + p.stderr
    p = as_user("alice", f"hpc-infer merge {run}")
    assert p.returncode == 2 and "--out" in p.stderr, p.stderr
    attack()
    p = as_user("alice", f"hpc-infer merge {run} --out /tmp/home-alice/out")
    assert p.returncode == 0, p.stdout + p.stderr
    assert "was not run" in p.stderr and not canary.exists(), p.stderr
    assert Path("/tmp/home-alice/out/results.jsonl").is_file()
    assert not (run / "results.jsonl").exists()
    attack(2)
    p = as_user("mallory", f"hpc-infer status {run}")
    assert p.returncode != 0, p.stdout
    p = as_user("mallory", f"hpc-infer merge {run} --out /tmp/home-mallory/out")
    assert p.returncode != 0, p.stdout
    shutil.rmtree("/tmp/home-alice/out", ignore_errors=True)
