"""The pinned handle and the rule on it (rundir/fsio.py, rundir/trust.py): ACLs count, a
swapped run directory is refused by its jobs, and the doors added to the rule this round
(report, job ids, #SBATCH values, status output, secrets in sweeps) hold. Root makes the
ACL entries (for uid `nobody`); no second login is needed."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import compose, sh, user_env
from hpc_infer.errors import DamagedFile, UserError
from hpc_infer.rundir import trust
from hpc_infer.rundir.fsio import PIN_ENV, PinnedDir, split_name


@pytest.fixture
def need_acl_tools(as_root):
    if shutil.which("setfacl") is None:
        from conftest import skip_or_fail

        skip_or_fail("setfacl is missing (Debian's acl package; scripts/setup.sh installs it)")


need_acl = pytest.mark.usefixtures("need_acl_tools")


def _private(tmp_path: Path, name: str = "d") -> Path:
    d = tmp_path / name
    d.mkdir()
    d.chmod(0o700)
    return d


@need_acl
@pytest.mark.parametrize(
    "acl, why",
    [
        ("u:nobody:rwx", "writable by user nobody (ACL entry)"),
        ("g:nogroup:rwx", "writable by group nogroup (ACL entry)"),
        ("u:nobody:r-x,m::rwx", "ACL mask allows write while named entries exist"),
        ("d:u:nobody:rwx", "default ACL"),
    ],
)
def test_an_acl_that_lets_another_user_write_is_refused(tmp_path, acl, why):
    d = _private(tmp_path)
    trust.open_dir(d, "run directory")  # the plain private folder passes
    subprocess.run(["setfacl", "-m", acl, str(d)], check=True)
    with pytest.raises(UserError, match=re.escape(why)) as e:
        trust.open_dir(d, "run directory")
    assert "setfacl -R -b" in str(e.value)  # the fix, named
    with pytest.raises(UserError, match=re.escape(why)):
        trust.check(d, "run directory")


@need_acl
def test_an_acl_on_a_sub_folder_or_a_file_is_refused_when_opened(tmp_path):
    d = _private(tmp_path)
    (d / "claims").mkdir()
    (d / "worker.json").write_text("{}")
    subprocess.run(["setfacl", "-m", "u:nobody:rwx", str(d / "claims")], check=True)
    subprocess.run(["setfacl", "-m", "u:nobody:rw", str(d / "worker.json")], check=True)
    h = trust.open_dir(d, "run directory")
    with pytest.raises(UserError, match="ACL entry"):
        h.listdir("claims")
    with pytest.raises(UserError, match="ACL entry"):
        trust.open_checked(d / "worker.json", "worker.json")


def test_names_never_leave_the_handle_and_links_are_not_followed(tmp_path):
    d = _private(tmp_path)
    outside = tmp_path / "outside"
    outside.write_text("canary")
    os.symlink(outside, d / "link")
    os.symlink(tmp_path, d / "dirlink")
    h = PinnedDir(d)
    for bad in ("../outside", "/etc/passwd", "a//b", "./x", ""):
        with pytest.raises(ValueError):
            split_name(bad)
    with pytest.raises(DamagedFile, match="a symbolic link where the run keeps a file"):
        h.read("link")  # refused and named, never followed
    with pytest.raises(OSError):
        h.read("dirlink/outside")
    h.replace("link", b"ours")  # replaced as a name: the link itself, never its target
    assert outside.read_text() == "canary" and (d / "link").read_bytes() == b"ours"


def test_a_run_directory_swapped_under_its_path_is_refused_by_its_workers(tmp_path, monkeypatch):
    """The parent exchange: the run renamed away and another folder (a copy, run_id included)
    put at its path. A worker given the run's pin refuses it and names it; the real one passes."""
    from hpc_infer.run.plan import plan_input, prepare
    from hpc_infer.worker.worker import open_run

    rc = compose(f"output_root={tmp_path}/runs", "data=example", "cluster=local")
    run, _ = prepare(rc, plan_input(rc), "/m", "")
    pin = run.fs.pin()
    monkeypatch.setenv(PIN_ENV, pin.encode())
    open_run(run.root)  # the real one
    assert (run.root / "run_id").stat().st_mode & 0o077 == 0  # its owner alone can read the id
    moved = run.root.with_name("moved")
    os.rename(run.root, moved)
    shutil.copytree(moved, run.root)
    with pytest.raises(UserError, match="not the run directory this job was started for"):
        open_run(run.root)
    assert run.fs.pin() == pin  # the launcher's handle still points at the run it made


def test_report_reads_only_inside_the_run_escapes_every_value_and_writes_only_where_you_own(tmp_path):
    from hpc_infer.run.report import write_report

    run = _private(tmp_path, "run")
    secret = tmp_path / "someone_elses.jsonl"
    secret.write_text(json.dumps({"id": "CANARY", "outputs": [{"text": "CANARY"}]}) + "\n")
    (run / "manifest.json").write_text("{}")
    (run / "worker.json").write_text(json.dumps({"sampling": {"max_tokens": 4}, "permissions": "private"}))
    summary = {
        "results": str(secret),  # a path outside the run: never read
        "timeline": "../../etc/passwd",
        "records": 1,
        "records_expected": 1,
        "output_tokens": 1,
        "output_tokens_per_s": 1.0,
        "wall_s": 1.0,
        "error_types": {"<script>alert(1)</script>": 1},
        "postprocess": {"target": "<img src=x onerror=alert(2)>", "metrics": {"records": "<b>1</b>", "score": "s"}},
    }
    (run / "summary.json").write_text(json.dumps(summary))
    page = write_report([run]).read_text()
    assert "CANARY" not in page and "root:" not in page
    assert "<script>alert" not in page and "<img src=x" not in page and "<b>1</b>" not in page
    assert (run / "report.html").stat().st_mode & 0o077 == 0  # a private run's records stay private
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(UserError, match="--out"):
        write_report([run], shared / "r.html")
    summary["records"] = "many"
    (run / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(UserError, match="not a number"):
        write_report([run])


def test_job_ids_read_back_are_the_schedulers_grammar_and_never_options(tmp_path):
    from hpc_infer.cluster.submit import slurm_ids
    from hpc_infer.rundir import jobs

    assert slurm_ids(["123", "123_4", "9+1", "--user=bob", "-1", "12;rm", ""]) == ["123", "123_4", "9+1"]
    (tmp_path / "jobs").mkdir()
    jobs.add(tmp_path, "slurm", "workers", ["55"])
    (tmp_path / "jobs" / "00000000000000000001-x.json").write_text(
        json.dumps({"backend": "slurm", "kind": "workers", "job_ids": ["--user=victim"], "time": 1})
    )
    assert [r.job_ids for r in jobs.records(tmp_path)] == [["55"]]


@pytest.mark.parametrize(
    "override, named",
    [("cluster.partition='gpu --wrap=evil'", "cluster.partition"), ("cluster.account='a b'", "cluster.account")],
)
def test_sbatch_values_with_spaces_are_refused(tmp_path, override, named):
    p = sh(tmp_path, f'hpc-infer sbatch cluster=slurm_local data.limit=2 output_root={tmp_path}/o "{override}"')
    assert p.returncode == 2 and named in p.stderr and "space" in p.stderr, p.stderr


def test_status_prints_a_runs_control_characters_escaped(tmp_path):
    from hpc_infer.log import printable

    assert printable("w1\x1b[2J\nFAKE LINE") == "w1\\x1b[2J\\nFAKE LINE"
    rc = compose(f"output_root={tmp_path}/runs", "data=example", "cluster=local")
    from hpc_infer.run.plan import plan_input, prepare

    run, _ = prepare(rc, plan_input(rc), "/m", "")
    beat = {"worker": "evil\x1b]0;pwned\x07\nworker fake finished", "state": "failed", "error": "x\x1b[31m", "t": 1}
    (run.root / "heartbeats" / "evil.json").write_text(json.dumps(beat))
    p = sh(tmp_path, f"hpc-infer status {run.root}")
    assert "\x1b" not in p.stdout + p.stderr and "\\x1b" in p.stdout, p.stdout + p.stderr


@pytest.mark.parametrize(
    "file, edit, named",
    [
        ("manifest.json", lambda m: m.update(extra=1), "extra: not a key hpc_infer writes there"),
        ("manifest.json", lambda m: m["chunks"][0].update(bytes="12"), "chunks[0].bytes: must be a whole number"),
        ("manifest.json", lambda m: m.update(n_chunks=m["n_chunks"] + 1), "but the chunk table has"),
        ("worker.json", lambda w: w["env"].update(PYTHONPATH=["/evil"]), "env.PYTHONPATH: must be a string"),
        ("worker.json", lambda w: w["model"].pop("path"), "model.path: missing"),
    ],
)
def test_a_run_file_read_back_is_checked_against_its_shape(tmp_path, file, edit, named):
    """manifest.json and worker.json are read back against their shapes (rundir/schema.py):
    an unknown key, a missing one or a wrong type stops `status`, `merge` and the worker,
    naming the file and the key; a heartbeat with a wrong type is read as no heartbeat."""
    from hpc_infer.rundir import RunDir, beats
    from hpc_infer.run.plan import plan_input, prepare

    rc = compose(f"output_root={tmp_path}/runs", "data=example", "cluster=local")
    run, _ = prepare(rc, plan_input(rc), "/m", "")
    value = json.loads((run.root / file).read_text())
    edit(value)
    (run.root / file).write_text(json.dumps(value))
    for door in ("status", "merge") if file == "manifest.json" else ("merge",):
        p = sh(tmp_path, f"hpc-infer {door} {run.root}")
        assert p.returncode == 2 and file in p.stderr and named in p.stderr, (door, p.stderr)
    with pytest.raises(DamagedFile, match=re.escape(named)):
        RunDir(run.root).read_json(file)  # the worker's own read, too
    beat = {"worker": "w", "state": "running", "pid": "1; kill"}
    (run.root / "heartbeats" / "w.json").write_text(json.dumps(beat))
    assert beats.read_beat(RunDir(run.root).fs, "heartbeats/w.json", 0.0) is None
    beat["pid"] = 1
    (run.root / "heartbeats" / "w.json").write_text(json.dumps(beat))
    assert beats.read_beat(RunDir(run.root).fs, "heartbeats/w.json", 0.0) is not None


@pytest.mark.parametrize(
    "arg",
    [
        "+key={A: 1},{MY_TOKEN: abcdefgh}",
        "+x=choice(1,{db_dsn: zzz})",
        "+cluster.env={SSHPASS: hunter22}",
        "+y=https://abcdefghijklmnopqrstuvwxyz012@example.org/x",
    ],
)
def test_a_secret_in_any_sweep_point_is_refused_before_hydra_writes(tmp_path, arg):
    p = sh(tmp_path, f"hpc-infer launch --multirun output_root={tmp_path}/o '{arg}'")
    assert p.returncode == 2 and "secrets do not belong" in p.stderr, p.stderr
    assert not list(tmp_path.rglob("multirun.yaml")) and "hunter22" not in p.stderr + p.stdout


def _serve(app, port: int):
    import threading

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    while not server.started:
        import time

        time.sleep(0.02)
    return server, t


def test_a_relayed_or_malformed_proof_never_verifies(tmp_path, monkeypatch):
    """Two replicas of one run (their proofs bound to their own port, index and job); a
    listener on a dead replica's port relays the challenge to the live sibling: refused.
    Answers of the wrong shape are refusals, never errors."""
    import http.server
    import threading
    import urllib.request

    from hpc_infer.host.http import proves_ours
    from hpc_infer.host.ports import free_port
    from hpc_infer.serve.auth import RequireKey

    async def hello(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"hi"})

    key, run = "k" * 32, str(tmp_path)
    monkeypatch.setenv("VLLM_API_KEY", key)
    monkeypatch.setenv("HPC_INFER_RUN_DIR", run)
    monkeypatch.setenv("HPC_INFER_REPLICA", "1")
    monkeypatch.setenv("HPC_INFER_JOB_ID", "77_1")
    live_port, dead_port, junk_port = free_port(30000, 40000), free_port(40000, 50000), free_port(50000, 60000)
    server, thread = _serve(RequireKey(hello), live_port)
    answers = iter([b"[1, 2]", '{"proof": "\u00e9'.encode() + b'"}', b'{"proof": "' + b"a" * 5000 + b'"}', b"{"])

    class Relay(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.server.server_port == dead_port:  # pass the challenge on to the live sibling
                body = urllib.request.urlopen(f"http://127.0.0.1:{live_port}{self.path}").read()
            else:
                body = next(answers)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    relays = [http.server.ThreadingHTTPServer(("127.0.0.1", p), Relay) for p in (dead_port, junk_port)]
    for r in relays:
        threading.Thread(target=r.serve_forever, daemon=True).start()
    try:
        assert proves_ours(f"http://127.0.0.1:{live_port}", key, run, 1, "77_1")  # the real one
        assert not proves_ours(f"http://127.0.0.1:{live_port}", key, run, 0, "77_0")  # not replica 0
        assert not proves_ours(f"http://127.0.0.1:{dead_port}", key, run, 0, "77_0")  # relayed
        assert not proves_ours(f"http://127.0.0.1:{dead_port}", key, run, 1, "77_1")  # relayed, even as 1
        for _ in range(4):  # a list, non-ASCII, oversized, cut JSON: refusals
            assert not proves_ours(f"http://127.0.0.1:{junk_port}", key, run, 0, "77_0")
    finally:
        for r in relays:
            r.shutdown()
        server.should_exit = True
        thread.join(10)


def test_only_a_hook_defined_in_the_package_passes_as_shipped():
    """A text prefix let `hpc_infer.rewards.<module it imports>.<anything>` through; the hook
    is now resolved and must be a function defined there under exactly that name."""
    from hpc_infer.cli import shipped_hook

    assert shipped_hook("hpc_infer.rewards.r1_zero_reward")
    for target in (
        "hpc_infer.rewards.math_grader.re.compile",  # an import of the module: not ours
        "hpc_infer.rewards.Callable",
        "hpc_infer.rewardsevil.run",
        "hpc_infer.rewards.nothing_here",
    ):
        assert not shipped_hook(target), target


def test_the_tune_store_decides_engine_flags_only_under_the_rule_and_only_tunes_keys(tmp_path):
    from hpc_infer.worker.tuner import candidates
    from hpc_infer.run.plan import TUNABLE, tuned_settings

    assert TUNABLE == {k for g in candidates({"model": {"engine_kwargs": {}}}) for k in g}  # the grid's own keys
    rc = compose(f"output_root={tmp_path}/o", "data=example", "cluster=local")
    rc.tuned_path.parent.mkdir(parents=True)
    rc.tuned_path.write_text("model:\n  engine_kwargs:\n    max_num_seqs: 64\n")
    assert tuned_settings(rc)["engine_kwargs"] == {"max_num_seqs": 64}
    rc.tuned_path.write_text("model:\n  engine_kwargs:\n    trust_remote_code: true\n")
    with pytest.raises(UserError, match="trust_remote_code.*tune.use=false"):
        tuned_settings(rc)
    rc.tuned_path.write_text("model:\n  engine_kwargs:\n    max_num_seqs: 64\n")
    rc.tuned_path.parent.chmod(0o777)  # a store others can write: its settings are not taken
    with pytest.raises(UserError, match="writable by everyone"):
        tuned_settings(rc)
    rc.tuned_path.parent.chmod(0o755)
    target = tmp_path / "elsewhere.yaml"
    target.write_text("model:\n  engine_kwargs:\n    max_num_seqs: 8\n")
    rc.tuned_path.unlink()
    rc.tuned_path.symlink_to(target)  # a link in the settings' place is never followed
    with pytest.raises(UserError, match="not the settings"):
        tuned_settings(rc)


def test_hydra_paths_are_resolved_for_every_sweep_point_before_hydra_writes(tmp_path):
    """`hydra.sweep.subdir` built from `${hydra.job.num}`: the first job's folder is harmless,
    the second's resolves to the token. Each point is composed as Hydra will compose it (its
    job number set), so the launch is refused before multirun.yaml or any folder exists."""
    token = "hf_" + "q" * 34
    env = {"HF_TOKEN": token, "SUB0": "plain", "SUB1": token}
    sub = shlex.quote("hydra.sweep.subdir='${oc.env:SUB${hydra.job.num}}'")
    p = sh(tmp_path, f"hpc-infer launch --multirun output_root={tmp_path}/o seed=1,2 {sub}", env=user_env(env))
    assert p.returncode == 2 and "hydra.sweep.subdir (sweep job 1 of 2)" in p.stderr, p.stderr
    assert not list(tmp_path.rglob("multirun.yaml")) and token not in p.stderr + p.stdout
    assert not (tmp_path / "o").exists()


def test_each_value_of_a_multirun_sweep_is_checked_for_its_type(tmp_path):
    """`--multirun seed=1,x` names the bad value, before anything is written (`seed=1,2`, two
    whole numbers, passes this check: the test above reaches the secret check with it)."""
    p = sh(tmp_path, f"hpc-infer launch --multirun output_root={tmp_path}/o seed=1,x")
    assert p.returncode == 2 and "seed=x: must be a whole number" in p.stderr, p.stderr
    assert not (tmp_path / "o").exists() and not list(tmp_path.rglob("multirun.yaml"))


def test_a_port_someone_listens_on_is_not_free():
    """What a restarting replica asks before it reuses the port its clients know
    (serve/replica.py): taken by any listener, it moves to a free one at once."""
    import socket

    from hpc_infer.host.ports import free_port, port_free

    port = free_port(20000, 60000)
    assert port_free(port)
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        assert not port_free(port)
    assert port_free(port)


def test_serve_state_files_of_the_wrong_shape_read_as_absent():
    """A replica's or the router's state file with a wrong type (a port that is a string, a
    replica number that is not one) is read as no state: never a URL or a port to use."""
    from hpc_infer.rundir import schema

    good = {"replica": 0, "state": "ready", "port": 8000, "url": "http://n1:8000/v1", "pid": 7, "restarts": 1}
    assert schema.problems(good, schema.REPLICA_STATE) == []
    for bad in ({**good, "port": "8000 --evil"}, {**good, "replica": "0"}, {**good, "pid": None}, [good]):
        assert schema.problems(bad, schema.REPLICA_STATE), bad
    assert schema.problems({"state": "ready", "url": 5}, schema.ROUTER_STATE) == ["url: must be a string or null"]


def test_a_run_swapped_away_while_its_jobs_are_submitted_is_said_not_a_traceback(tmp_path):
    """submitit takes the logs folder by path: a run swapped for another folder mid-submission
    made the launch die on a missing file with a traceback (tests/test_doors.py's exchange
    attack, seed 11998878, under load). Now it is a UserError naming what happened; where the
    path was not swapped and nobody else could swap it, the error is the original one."""
    from hpc_infer.launch import swapped_while_submitting
    from hpc_infer.rundir import RunDir
    from hpc_infer.rundir.fsio import new_run_id

    (tmp_path / "runs" / "r").mkdir(parents=True)
    os.chmod(tmp_path / "runs", 0o700)
    run = RunDir(tmp_path / "runs" / "r")
    new_run_id(run.fs)
    with pytest.raises(FileNotFoundError):  # nothing swapped, nobody else can: the error as it was
        with swapped_while_submitting(run):
            raise FileNotFoundError(2, "No such file or directory", str(run.logs / "x.pkl"))
    os.rename(tmp_path / "runs" / "r", tmp_path / "runs" / "away")
    (tmp_path / "runs" / "r").mkdir()  # another folder at the run's path
    with pytest.raises(UserError, match="not the run directory planned any more: it was moved or replaced"):
        with swapped_while_submitting(run):
            raise FileNotFoundError(2, "No such file or directory", str(run.logs / "x.pkl"))
