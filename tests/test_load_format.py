"""`model.load_format`: the pre-flight refuses what the worker could not load, before any
job exists; `hpc-infer cache shard` writes a sharded-state copy that a run then loads."""

import os
import subprocess
from pathlib import Path

import pytest

from conftest import compose, read_results, run_launch, user_env
from hpc_infer.errors import UserError


def _preflight(model_path, *overrides):
    from hpc_infer.cluster.preflight import preflight

    rc = compose("cluster=local", f"model.path={model_path}", *overrides)
    return preflight(rc.model, rc.cluster, model_path, host_mem_gib=64)


def test_sharded_state_needs_the_copy_for_this_layout(tmp_path, cpu_model):
    with pytest.raises(UserError, match=r"has no sharded-state files.*hpc-infer cache shard .* --tp 1 --pp 1"):
        _preflight(cpu_model, "model.load_format=sharded_state")
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "config.json").write_text((Path(cpu_model) / "config.json").read_text())
    for rank in (0, 1):
        (copy / f"model-rank-{rank}-part-0.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match=r"written for TP=2 x PP=1, and this run needs TP=1 x PP=1"):
        _preflight(copy, "model.load_format=sharded_state")


def _fake_copy(at: Path, cpu_model, dtype: str, meta: bool) -> Path:
    """A sharded copy's files (headers only) written in `dtype`, with or without our META."""
    import json
    import struct

    at.mkdir()
    (at / "config.json").write_text((Path(cpu_model) / "config.json").read_text())
    st = {"bfloat16": "BF16", "float32": "F32"}[dtype]
    header = json.dumps({"w": {"dtype": st, "shape": [2, 2], "data_offsets": [0, 4 * (4 if st == "F32" else 2)]}})
    (at / "model-rank-0-part-0.safetensors").write_bytes(struct.pack("<Q", len(header)) + header.encode() + bytes(16))
    if meta:
        (at / ".hpc_infer.json").write_text(json.dumps({"dtype": dtype}))
    return at


def test_sharded_copy_in_another_dtype_is_refused_naming_both_fixes(tmp_path, cpu_model):
    """A copy written in bfloat16 (what `auto` gives for SmolLM2) and a float32 run (the CPU
    default): refused before anything runs, naming model.dtype and `cache shard --dtype`;
    the dtype is read from `cache shard`'s record, or from the weights' own headers."""
    for meta in (True, False):
        copy = _fake_copy(tmp_path / f"bf16-{meta}", cpu_model, "bfloat16", meta)
        with pytest.raises(
            UserError,
            match=r"written in bfloat16 and this run loads float32 \(model.dtype=float32\): "
            r"set model.dtype=bfloat16, or write a copy in float32 with "
            r"`hpc-infer cache shard SOURCE --root DIR --tp 1 --dtype float32`",
        ):
            _preflight(copy, "model.load_format=sharded_state")
        _preflight(copy, "model.load_format=sharded_state", "model.dtype=bfloat16")  # the same dtype: accepted
    _preflight(_fake_copy(tmp_path / "f32", cpu_model, "float32", True), "model.load_format=sharded_state")


def test_a_copy_that_lost_weights_is_named(tmp_path, cpu_model):
    """What vLLM's CPU build wrote before `cache shard` kept the linear weights: a copy with
    fewer elements than the checkpoint is never published."""
    from hpc_infer.models.load_format import incomplete_copy

    copy = _fake_copy(tmp_path / "c", cpu_model, "float32", True)
    why = incomplete_copy(copy, Path(cpu_model))
    assert why and "holds 4 weight elements" in why and "without some of the model's weights" in why, why
    assert incomplete_copy(Path(cpu_model), Path(cpu_model)) is None


def test_loader_package_missing_where_the_worker_runs(tmp_path, cpu_model):
    import importlib.util

    if importlib.util.find_spec("runai_model_streamer"):  # the test needs it missing: never the case in CI
        if os.environ.get("HPC_INFER_REQUIRE_SLURM") == "1":
            pytest.fail("runai_model_streamer is installed in CI's venv: this test needs it missing")
        pytest.skip("runai_model_streamer is installed in this venv")
    with pytest.raises(UserError, match=r"runai_model_streamer does not import for .*pip install vllm\[runai\]"):
        _preflight(cpu_model, "model.load_format=runai_streamer")
    bins = tmp_path / "bins"
    bins.mkdir()
    (bins / "config.json").write_text((Path(cpu_model) / "config.json").read_text())
    (bins / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(UserError, match=r"has no \*.safetensors files; this loader reads only safetensors"):
        _preflight(bins, "model.load_format=safetensors")


def test_refused_through_launch_before_any_run_dir(tmp_path, cpu_model):
    p = run_launch(tmp_path, "cluster=local", "model.load_format=sharded_state", check=False)
    assert p.returncode == 2 and "model.load_format=sharded_state" in p.stderr and "cache shard" in p.stderr, p.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.slow
def test_cache_shard_then_a_run_loads_the_copy(tmp_path, cpu_model):
    """vLLM writes the copy (model-rank-0-part-0.safetensors + config and tokenizer) in the
    run's float32, the console script publishes it into the root, and a run with
    load_format=sharded_state loads it: greedy text from real weights. float32 is the dtype
    vLLM's CPU build hands to oneDNN on every x86 machine (AVX2 and AVX-512): the copy must
    still hold every linear weight (it held none before `cache shard` kept them)."""
    env = user_env(
        {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_CPU_KVCACHE_SPACE": "1"}
    )
    p = subprocess.run(
        ["bash", "-c", f"hpc-infer cache shard {cpu_model} --root {tmp_path}/models --tp 1 --dtype float32"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    copy = Path(p.stdout.strip().splitlines()[-1])
    assert copy == tmp_path / "models" / "SmolLM2-135M-Instruct-tp1"
    assert [f.name for f in copy.glob("*.safetensors")] == ["model-rank-0-part-0.safetensors"]
    assert (copy / "tokenizer.json").is_file() and not list((tmp_path / "models").glob(".*staging*"))
    assert f"model.path={copy} model.load_format=sharded_state" in p.stderr
    from hpc_infer.models.load_format import copy_dtype, incomplete_copy

    assert copy_dtype(copy) == "float32" and incomplete_copy(copy, Path(cpu_model)) is None
    run_launch(
        tmp_path,
        "cluster=debug",
        f"model.path={copy}",
        "model.load_format=sharded_state",
        "data=example_prompts",
        "data.limit=1",
        "sampling=greedy",
        "sampling.max_tokens=4",
    )
    (row,) = read_results(next((tmp_path / "runs").iterdir()) / "results.jsonl")
    assert "Paris" in row["text"], row
