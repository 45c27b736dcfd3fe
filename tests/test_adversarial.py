"""The standing adversarial suite: a hostile or careless neighbour on a shared cluster.

Each test is one class of bug a probe found (issue 11): a leaked token, a published
root-only file, records silently dropped or mixed, results corrupted by a race. Add a
case here for every new finding. Nothing lost, nothing leaked, nothing mixed: a clear
error otherwise.
"""

import json
import multiprocessing as mp
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import compose, sh, user_env
from hpc_infer.models import cache_admin
from hpc_infer.io.data import load_records
from hpc_infer.errors import UserError
from hpc_infer.run.merge import merge
from hpc_infer.run.plan import plan_input, prepare
from hpc_infer.rundir import read_chunk_records, RunDir, encode_chunk_output, read_json, write_atomic

TOKEN = "hf_AdversarialProbeToken0123456789abcd"


def all_bytes(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in folder.rglob("*") if p.is_file()) if folder.exists() else b""


def finish_all(run: RunDir) -> int:
    n = read_json(run.manifest)["n_chunks"]
    for cid in range(n):
        rows = [
            dict(r, text="t", outputs=[{"text": "t"}], prompt_tokens=1, output_tokens=1)
            for r in read_chunk_records(run, cid)
        ]
        write_atomic(run.out_path(cid), encode_chunk_output(cid, rows, worker="w", started=1.0, finished=2.0))
    return n


# --- secrets: one check, every entry point, before anything is written ------------------------


@pytest.mark.parametrize(
    "entry",
    ["hpc-infer launch", "hpc-infer sbatch", "hpc-infer launch -m", "python -m hpc_infer.launch", "hpc-infer serve"],
)
@pytest.mark.parametrize(
    "override",
    [
        f"+cluster.env.HF_TOKEN={TOKEN}",
        f"+model.engine_kwargs.hf_token={TOKEN}",
        "+cluster.env.MY_API_KEY=abc123secretvalue",
        f"data.system_prompt={TOKEN}",
        f"+cluster.env.NOTE=prefix-{TOKEN}",
    ],
)
def test_secret_refused_by_every_entry_before_any_file(tmp_path, entry, override):
    p = sh(tmp_path, f"{entry} '{override}' cluster=local output_root={tmp_path}/runs")
    assert p.returncode == 2, p.stderr[-2000:]
    assert "secrets do not belong in the config" in p.stderr and "value not shown" in p.stderr
    secret = override.split("=", 1)[1]
    assert secret not in p.stdout + p.stderr  # not echoed (Hydra would)
    assert secret.encode() not in all_bytes(tmp_path)  # no multirun.yaml, config dump or script holds it
    assert not (tmp_path / "runs").exists()


# Secrets that arrive through interpolation: checked resolved, where they would be written.
PLAIN_SECRET = "plain-secret-value-42"  # a secret that does not look like a token


INTERPOLATED = [
    "+cluster.env.FOO=${oc.env:HF_TOKEN}",
    "run_name=${oc.env:HF_TOKEN}",
    "+cluster.env.FOO=x${oc.env:HUGGING_FACE_HUB_TOKEN}y",
    "data.system_prompt=${oc.env:WANDB_API_KEY}",
    "+cluster.env.FOO=${oc.env:INNOCENT_NAME}",
    "+cluster.env.FOO=${oc.env:INNOCENT_NAME,default}",
    f"+cluster.env.FOO={PLAIN_SECRET}",
]


# every entry point with two of the forms, every form through one entry (the check is shared)
@pytest.mark.parametrize(
    "entry, override",
    [
        *[
            (e, o)
            for e in ("hpc-infer launch", "hpc-infer sbatch", "hpc-infer launch -m", "hpc-infer serve")
            for o in INTERPOLATED[:2]
        ],
        *[("hpc-infer sbatch", o) for o in INTERPOLATED[2:]],
    ],
)
def test_secret_through_interpolation_refused_before_any_file(tmp_path, entry, override):
    env = user_env(
        {"HF_TOKEN": TOKEN, "HUGGING_FACE_HUB_TOKEN": TOKEN, "WANDB_API_KEY": PLAIN_SECRET, "INNOCENT_NAME": TOKEN}
    )
    p = sh(tmp_path, f"{entry} '{override}' cluster=local output_root={tmp_path}/runs", env=env)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "value not shown" in p.stderr
    for secret in (TOKEN, PLAIN_SECRET):
        assert secret not in p.stdout + p.stderr
        assert secret.encode() not in all_bytes(tmp_path)  # no multirun.yaml, dump, script or run dir name
    assert not (tmp_path / "runs").exists()


def test_secret_interpolated_in_a_config_file_is_refused_resolved(tmp_path):
    conf = tmp_path / "conf" / "cluster"
    conf.mkdir(parents=True)
    (conf / "mine.yaml").write_text("defaults: [local, _self_]\nname: mine\nenv:\n  NOTE: ${oc.env:SOME_VAR}\n")
    p = sh(
        tmp_path,
        f"hpc-infer sbatch --config-dir {tmp_path}/conf cluster=mine output_root={tmp_path}/runs",
        env=user_env({"SOME_VAR": TOKEN}),
    )
    assert p.returncode == 2 and "cluster.env.NOTE: resolves to a secret" in p.stderr, p.stderr
    assert TOKEN.encode() not in all_bytes(tmp_path) and not (tmp_path / "runs").exists()


def test_a_refused_multirun_writes_nothing_and_hydra_files_follow_permissions(tmp_path):
    p = sh(
        tmp_path,
        f"umask 022; hpc-infer launch -m '+cluster.env.A=${{oc.env:HF_TOKEN}}' seed=1,2 output_root={tmp_path}/runs",
        env=user_env({"HF_TOKEN": TOKEN}),
    )
    assert p.returncode == 2 and not (tmp_path / "runs").exists()
    p = sh(
        tmp_path,
        f"umask 022; hpc-infer sbatch -m run_name=a,b data.limit=2 cluster=slurm_local output_root={tmp_path}/runs",
    )
    assert p.returncode == 0, p.stderr[-2000:]
    hydra_files = list((tmp_path / "runs" / ".multirun").rglob("*"))
    assert hydra_files and all(stat.S_IMODE(f.stat().st_mode) & 0o077 == 0 for f in hydra_files), {
        str(f): oct(stat.S_IMODE(f.stat().st_mode)) for f in hydra_files
    }


def test_secret_in_a_config_file_is_refused(tmp_path):
    conf = tmp_path / "conf" / "cluster"
    conf.mkdir(parents=True)
    (conf / "mine.yaml").write_text(f"defaults: [local, _self_]\nname: mine\nenv:\n  WANDB_API_KEY: {TOKEN}\n")
    p = sh(tmp_path, f"hpc-infer sbatch --config-dir {tmp_path}/conf cluster=mine output_root={tmp_path}/runs")
    assert p.returncode == 2 and "cluster.env.WANDB_API_KEY: secrets do not belong" in p.stderr
    assert TOKEN not in p.stderr and not (tmp_path / "runs").exists()


# --- file modes on a shared file system -------------------------------------------------------


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def test_run_files_are_private_by_default(tmp_path):
    p = sh(tmp_path, f"umask 022; hpc-infer sbatch cluster=slurm_local data.limit=3 output_root={tmp_path}/runs")
    assert p.returncode == 0, p.stderr[-2000:]
    modes = _modes(Path(p.stdout.strip()).parent)
    assert modes["job.sbatch"] == 0o700 and modes["manifest.json"] == 0o600 and modes["."] == 0o700
    assert all(m & 0o077 == 0 for m in modes.values()), {k: oct(m) for k, m in modes.items() if m & 0o077}


def test_group_permissions_share_with_the_group_only(tmp_path):
    import grp

    group = grp.getgrgid(os.getgid()).gr_name
    p = sh(
        tmp_path,
        f"umask 022; hpc-infer sbatch cluster=slurm_local data.limit=3 permissions=group "
        f"run_group={group} output_root={tmp_path}/runs",
    )
    assert p.returncode == 0, p.stderr[-2000:]
    root = Path(p.stdout.strip()).parent
    modes = _modes(root)
    assert modes["."] == 0o2750 and modes["manifest.json"] == 0o640
    assert all(m & 0o007 == 0 for m in modes.values())  # nothing for others


def test_group_run_results_and_a_standalone_merge_follow_the_runs_permissions(tmp_path):
    import grp

    group = grp.getgrgid(os.getgid()).gr_name
    (tmp_path / "runs").mkdir(mode=0o700)  # an output_root the group cannot enter
    rc = compose(
        f"output_root={tmp_path}/runs", "data=example", "cluster=local", "permissions=group", f"run_group={group}"
    )
    from hpc_infer.launch import unreachable_for_group
    from hpc_infer.rundir import set_permissions

    set_permissions("group")
    run, _ = prepare(rc, plan_input(rc), "/m", "")
    said = unreachable_for_group(run.root, group)
    assert said and str(tmp_path / "runs") in said and "chmod" in said
    finish_all(run)
    for fmt in ("jsonl", "parquet", "openai_batch"):
        merge(run, fmt)
    os.umask(0o077)  # a standalone `hpc-infer merge` by a user whose umask is private
    p = sh(tmp_path, f"umask 077; hpc-infer merge {run.root}")
    assert p.returncode == 0, p.stderr
    modes = _modes(run.root)
    for name in ("results.jsonl", "results.parquet", "results.openai_batch.jsonl", "summary.json", "timeline.png"):
        assert modes[name] == 0o640, (name, oct(modes[name]))


def test_merges_in_two_formats_never_replace_each_other(tmp_path):
    rc = compose(f"output_root={tmp_path}/runs", "data=example", "cluster=local")
    run, _ = prepare(rc, plan_input(rc), "/m", "")
    finish_all(run)
    a = merge(run, "jsonl")
    b = merge(run, "openai_batch")
    assert a.results != b.results and Path(a.results).exists() and Path(b.results).exists()
    assert "custom_id" not in Path(a.results).read_text() and "custom_id" in Path(b.results).read_text()


def test_endpoint_dirs_and_key_files_are_trusted_only_when_yours(tmp_path, monkeypatch):
    from hpc_infer.serve import batch_endpoint as ep
    from hpc_infer.serve import serverun

    home = tmp_path / "home"
    keys = home / ".config" / "hpc_infer" / "keys"
    keys.mkdir(parents=True, mode=0o700)
    monkeypatch.setattr(serverun, "KEYS_DIR", keys)
    stolen = tmp_path / "other_secret"  # any file the user can read, named as a "key file"
    stolen.write_text(TOKEN)
    stolen.chmod(0o600)
    serve_dir = tmp_path / "srv"
    (serve_dir / "serve").mkdir(parents=True, mode=0o700)
    serve_dir.chmod(0o700)
    (serve_dir / "serve.json").write_text(
        json.dumps({"served_name": "m", "key_file": str(stolen), "model": {"path": "/m"}, "replicas": 1})
    )
    (serve_dir / "serve.json").chmod(0o600)
    rc = compose("cluster=local", f"cluster.endpoint={serve_dir}")
    with pytest.raises(UserError, match="not in your key directory"):
        ep.resolve_endpoint(rc)
    serve_dir.chmod(0o777)  # anyone could have edited it
    with pytest.raises(UserError, match="writable by everyone"):
        ep.resolve_endpoint(rc)
    serve_dir.chmod(0o700)
    (serve_dir / "serve.json").chmod(0o666)
    with pytest.raises(UserError, match="writable by everyone"):
        ep.resolve_endpoint(rc)
    (serve_dir / "serve.json").chmod(0o600)
    key = keys / "k.key"
    key.write_text("k")
    key.chmod(0o644)
    (serve_dir / "serve.json").write_text(
        json.dumps({"served_name": "m", "key_file": str(key), "model": {"path": "/m"}, "replicas": 1})
    )
    with pytest.raises(UserError, match="readable by others"):
        ep.resolve_endpoint(rc)
    os.chown(serve_dir / "serve.json", 12345, -1)  # another user's file (we are root in the tests)
    with pytest.raises(UserError, match="owned by uid 12345"):
        ep.resolve_endpoint(rc)


@pytest.mark.parametrize(
    "url",
    [
        "http://user:pw@host:1/v1",
        "http://host:1/v1/../../admin",
        "http://host:1/%2e%2e/x",
        "file:///etc/passwd",
        "http://host:1/v1?redirect=x",
        "http://host:1//v1",
        "http://host:99999/v1",
        "http://host:1/v1 x",
        "http:///v1",
    ],
)
def test_endpoint_urls_with_tricks_are_refused(tmp_path, url):
    from hpc_infer.serve.batch_endpoint import check_url
    from hpc_infer.worker.http_engine import url_problem

    with pytest.raises(UserError, match="refused"):
        check_url(url, "cluster.endpoint")
    assert url_problem(url)  # the worker applies the same rule to the state files it re-reads


def test_a_run_resumed_through_another_served_model_is_refused(tmp_path):
    rc = compose(f"output_root={tmp_path}/runs", "data=example", "cluster=local", "run_name=r")
    a = {
        "model": "org/a",
        "model_path": "/w/a",
        "urls": ["http://h:1/v1"],
        "run": None,
        "key_file": "/k",
        "concurrency": 1,
    }
    prepare(rc, plan_input(rc), "endpoint:x", "", a)
    prepare(rc, plan_input(rc), "endpoint:x", "", a)  # the same server: resumes
    with pytest.raises(UserError, match="served model"):
        prepare(rc, plan_input(rc), "endpoint:x", "", dict(a, model="org/b", model_path="/w/b"))
    with pytest.raises(UserError, match="served model"):
        prepare(rc, plan_input(rc), "/w/a", "")  # offline now: would mix two engines' outputs


# --- the admin cache, run as root --------------------------------------------------------------


@pytest.fixture
def model_dir(tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    src = tmp_path / "src" / "M"
    src.mkdir(parents=True)
    (src / "config.json").write_text('{"model_type": "llama"}')
    save_file({"w": np.ones((4, 4), dtype=np.float32)}, str(src / "model.safetensors"))
    (src / "model.safetensors").chmod(0o644)  # a model meant to be shared (safetensors writes 0600)
    return src


def test_stage_refuses_a_link_out_of_the_source_and_never_reads_it(tmp_path, model_dir):
    secret = tmp_path / "secret_token"
    secret.write_text(TOKEN)
    secret.chmod(0o600)
    (model_dir / "tokenizer.json").symlink_to(secret)
    with pytest.raises(UserError, match="a link out of"):
        cache_admin.stage(str(model_dir), str(tmp_path / "shared"))
    assert TOKEN.encode() not in all_bytes(tmp_path / "shared")
    assert not (tmp_path / "shared" / "M").exists()


def test_stage_keeps_a_private_non_model_file_private(tmp_path, model_dir):
    (model_dir / "notes_token").write_text(TOKEN)
    (model_dir / "notes_token").chmod(0o600)
    (model_dir / "inner.json").symlink_to(model_dir / "config.json")  # a link that stays inside is fine
    target = cache_admin.stage(str(model_dir), str(tmp_path / "shared"))
    assert stat.S_IMODE((target / "notes_token").stat().st_mode) == 0o600
    assert stat.S_IMODE((target / "model.safetensors").stat().st_mode) == 0o644  # a model file: published
    assert not (target / "inner.json").is_symlink() and (target / "inner.json").read_text() == '{"model_type": "llama"}'


def _published(target: Path) -> dict[str, int]:
    return {str(p.relative_to(target)): stat.S_IMODE(p.stat().st_mode) for p in target.rglob("*") if p.is_file()}


def test_stage_never_widens_a_hard_link_to_a_private_token(tmp_path, model_dir):
    token = tmp_path / "token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    os.link(token, model_dir / "tokenizer.model")  # a model file's name, the token's inode and mode
    with pytest.raises(UserError, match="others cannot read it at the source"):
        cache_admin.stage(str(model_dir), str(tmp_path / "shared"))
    assert TOKEN.encode() not in all_bytes(tmp_path / "shared")
    os.unlink(model_dir / "tokenizer.model")
    os.link(token, model_dir / "notes.txt")  # not a model file: kept private, and said
    target = cache_admin.stage(str(model_dir), str(tmp_path / "shared"))
    assert _published(target)["notes.txt"] == 0o600


@pytest.mark.parametrize("name", ["tokenizer.json", "notes.txt"])
def test_stage_never_widens_a_file_behind_a_private_folder(tmp_path, model_dir, name, capsys):
    hidden = model_dir / "sub"
    hidden.mkdir()
    (hidden / name).write_text(TOKEN)
    (hidden / name).chmod(0o644)  # readable itself, but only through a 0700 folder
    hidden.chmod(0o700)
    if name == "tokenizer.json":
        with pytest.raises(UserError, match="inside .*sub"):
            cache_admin.stage(str(model_dir), str(tmp_path / "shared"))
        assert TOKEN.encode() not in all_bytes(tmp_path / "shared")
    else:
        target = cache_admin.stage(str(model_dir), str(tmp_path / "shared"))
        assert _published(target)["sub/notes.txt"] == 0o600 and "kept private" in capsys.readouterr().err
        assert stat.S_IMODE((target / "sub").stat().st_mode) & 0o777 == 0o755  # the folder, not its file


def test_stage_never_widens_a_link_into_a_hidden_private_folder(tmp_path, model_dir):
    secret_dir = model_dir / ".secret"
    secret_dir.mkdir()
    (secret_dir / "t").write_text(TOKEN)
    (secret_dir / "t").chmod(0o644)
    secret_dir.chmod(0o700)
    (model_dir / "special_tokens_map.json").symlink_to(secret_dir / "t")
    with pytest.raises(UserError, match="others cannot read it at the source"):
        cache_admin.stage(str(model_dir), str(tmp_path / "shared"))
    assert TOKEN.encode() not in all_bytes(tmp_path / "shared")


def test_stage_turns_an_os_error_into_one_line(tmp_path, model_dir, monkeypatch):
    def boom(*a, **k):
        raise FileNotFoundError(2, "No such file or directory", str(model_dir / "gone"))

    monkeypatch.setattr(cache_admin.shutil, "copyfile", boom)  # a file removed mid-copy (a rename race)
    with pytest.raises(UserError, match="failed: No such file or directory .*nothing was published"):
        cache_admin.stage(str(model_dir), str(tmp_path / "shared"))
    assert not (tmp_path / "shared" / "M").exists()


@pytest.mark.parametrize(
    "kw",
    [
        {"name": ".."},
        {"name": "../x"},
        {"name": "a/b"},
        {"name": "."},
        {"hf_id": "org/.."},
        {"hf_id": "../../etc"},
        {"hf_id": "/abs/path"},
    ],
)
def test_stage_refuses_names_that_leave_the_root_before_touching_anything(tmp_path, model_dir, kw):
    root = tmp_path / "shared"
    with pytest.raises(UserError, match="--name|--hf-id"):
        cache_admin.stage(str(model_dir), str(root), **kw)
    assert not root.exists()


# --- races and inputs changed under us ----------------------------------------------------------


def test_fingerprint_is_of_the_bytes_that_were_read(tmp_path):
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(6)))
    rc = compose(f"data.path={data}", f"output_root={tmp_path}/runs", "cluster=local")
    planned = plan_input(rc)
    with open(data, "a") as f:  # the file grows between the read and the publish
        f.write("".join(json.dumps({"prompt": f"late{i}"}) + "\n" for i in range(4)))
    run, _ = prepare(rc, planned, "/m", "")
    m = read_json(run.manifest)
    assert m["n_records"] == 6 and m["input_bytes"] == planned.size == 6 * len(json.dumps({"prompt": "p0"}) + "\n")
    assert [r["prompt"] for c in range(m["n_chunks"]) for r in read_chunk_records(run, c)] == [
        f"p{i}" for i in range(6)
    ]
    with pytest.raises(UserError, match="different input file"):  # a relaunch sees 10 records: refused, not "resumed"
        prepare(rc, plan_input(rc), "/m", "")


def _first_launch(path, out, barrier, q):
    rc = compose(f"data.path={path}", f"output_root={out}", "run_name=same", "cluster=local")
    planned = plan_input(rc)
    barrier.wait()
    try:
        run, resumed = prepare(rc, planned, "/m", "")
        q.put(("ok", resumed))
    except UserError as e:
        q.put(("refused", str(e)))


@pytest.mark.parametrize("same_input", [True, False])
def test_two_first_launches_never_mix(tmp_path, same_input):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"prompt": f"a{i}"}) + "\n" for i in range(50)))
    b.write_text(a.read_text() if same_input else "".join(json.dumps({"prompt": f"b{i}"}) + "\n" for i in range(50)))
    barrier, q = mp.Barrier(2), mp.Queue()
    procs = [mp.Process(target=_first_launch, args=(p, tmp_path / "runs", barrier, q)) for p in (a, b)]
    for p in procs:
        p.start()
    results = sorted(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join()
    run = RunDir(tmp_path / "runs" / "same")
    if same_input:
        assert [r[0] for r in results] == ["ok", "ok"] and {r[1] for r in results} == {False, True}
    else:
        assert results[0][0] == "ok" and results[1][0] == "refused" and "different input file" in results[1][1]
    prompts = [r["prompt"] for c in range(read_json(run.manifest)["n_chunks"]) for r in read_chunk_records(run, c)]
    assert len(set(p[0] for p in prompts)) == 1 and len(prompts) == 50  # one input's records, complete
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["same"]  # no staging left behind


def _merge_proc(root):
    merge(RunDir(Path(root)))


def test_concurrent_merges_leave_one_intact_result(tmp_path):
    rc = compose(f"output_root={tmp_path}/runs", "data=example", "cluster=local")
    run, _ = prepare(rc, plan_input(rc), "/m", "")
    finish_all(run)
    procs = [mp.Process(target=_merge_proc, args=(str(run.root),)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert all(p.exitcode == 0 for p in procs)
    lines = (run.root / "results.jsonl").read_text().splitlines()
    assert [json.loads(line)["index"] for line in lines] == list(range(read_json(run.manifest)["n_records"]))
    assert not list(run.root.glob(".results*"))


def test_stray_files_in_out_never_count(tmp_path):
    rc = compose(f"output_root={tmp_path}/runs", "data=example", "cluster=local", "cluster.workers=2")
    run, _ = prepare(rc, plan_input(rc), "/m", "")
    n = finish_all(run)
    good = run.out_path(0).read_bytes()
    for cid in range(n):
        run.out_path(cid).unlink()
    (run.out / "00000.jsonl.bak").write_bytes(good)
    (run.out / "00001 (copy).jsonl").write_bytes(good)
    (run.out / "0000.jsonl").write_bytes(good)
    run.out_path(2).write_bytes(good)  # chunk 0's output under chunk 2's name: its trailer says otherwise
    assert run.done_chunks() == set()
    with pytest.raises(UserError, match="incomplete"):
        merge(run)


# a relaunch while an earlier launch's worker is live: two real launches in
# tests/test_vllm_runs.py::test_a_relaunch_waits_for_the_live_worker_of_an_earlier_launch


# cancel on real local workers (a real LocalExecutor job whose task ignores SIGTERM, as submitit's
# job code does): tests/test_processes.py


def test_a_deleted_run_is_not_recreated(tmp_path):
    rc = compose(f"output_root={tmp_path}/runs", "data=example", "cluster=local")
    run, _ = prepare(rc, plan_input(rc), "/m", "")
    import shutil

    shutil.rmtree(run.root)
    with pytest.raises(FileNotFoundError):
        write_atomic(run.out_path(0), b"x")  # a late worker's write fails instead of re-creating out/
    assert not run.root.exists()


# --- inputs altered without a word ----------------------------------------------------------------


def _read(tmp_path, name, content: bytes, **over):
    p = tmp_path / name
    p.write_bytes(content)
    extra = [f"data.{k}={v}" for k, v in over.items()]
    return load_records(compose(f"data.path={p}", *extra).data)


def test_unicode_line_separators_stay_inside_records(tmp_path):
    txt = "one\u2028still one\nnext\x85same\x0cline\n".encode()
    assert [r.prompt for r in _read(tmp_path, "p.txt", txt)] == ["one\u2028still one", "next\x85same\x0cline"]
    jl = (json.dumps({"prompt": "a\u2028b"}, ensure_ascii=False) + "\n").encode()
    assert [r.prompt for r in _read(tmp_path, "p.jsonl", jl)] == ["a\u2028b"]


def test_csv_with_a_byte_order_mark_keeps_its_id_column(tmp_path):
    recs = _read(tmp_path, "p.csv", "\ufeffid,prompt\nq1,What?\nq2,Why?\n".encode("utf-8"))
    assert [(r.id, r.prompt) for r in recs] == [("q1", "What?"), ("q2", "Why?")]
    assert all("\ufeffid" not in r.fields for r in recs)


def test_one_huge_line_is_refused_with_bounded_memory(tmp_path):
    big = tmp_path / "big.jsonl"
    with open(big, "wb") as f:
        f.write(b'{"prompt": "ok"}\n{"prompt": "')
        for _ in range(200):
            f.write(b"x" * (1 << 20))  # 200 MB on line 2
    code = (
        f"import resource; from conftest import compose; from hpc_infer.io.data import load_records\n"
        f"rc = compose('data.path={big}', 'data.max_line_bytes=1000000')\n"
        f"before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"try:\n    load_records(rc.data)\nexcept Exception as e:\n    print(type(e).__name__, e)\n"
        f"print('grew_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)"
    )
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=300
    )
    assert "UserError" in p.stdout and "line 2: longer than data.max_line_bytes=1000000" in p.stdout, p.stderr[-2000:]
    assert int(p.stdout.split("grew_kb")[1]) < 50_000  # not the 200 MB line (or 2x it) in memory


@pytest.mark.parametrize(
    "kind, expect", [("dir", "is a directory"), ("fifo", "is a named pipe"), ("dev", "is a device")]
)
def test_non_regular_inputs_named_for_what_they_are(tmp_path, kind, expect):
    path = {"dir": tmp_path, "dev": Path("/dev/zero"), "fifo": tmp_path / "pipe"}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    with pytest.raises(UserError, match=f"data.path: {path} {expect}"):
        compose(f"data.path={path}")


def test_chunks_are_bounded_in_records(tmp_path):
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"prompt": "p"}) + "\n" for _ in range(5000)))
    rc = compose(f"data.path={data}", f"output_root={tmp_path}/runs", "cluster.workers=1", "max_chunk_records=500")
    run, _ = prepare(rc, plan_input(rc), "/m", "")
    sizes = [c["n_records"] for c in read_json(run.manifest)["chunks"]]
    assert max(sizes) <= 500 and sum(sizes) == 5000
