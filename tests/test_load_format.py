"""`model.load_format`: the pre-flight refuses what the worker could not load, before any
job exists; `hpc-infer cache shard` writes a sharded-state copy that a run then loads."""

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


def test_loader_package_missing_where_the_worker_runs(tmp_path, cpu_model):
    import importlib.util

    if importlib.util.find_spec("runai_model_streamer"):
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
    """vLLM writes the copy (model-rank-0-part-0.safetensors + config and tokenizer), the
    console script publishes it into the root, and a run with load_format=sharded_state
    loads it: greedy text from real weights."""
    env = user_env({"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                    "VLLM_CPU_KVCACHE_SPACE": "1"})
    p = subprocess.run(["bash", "-c", f"hpc-infer cache shard {cpu_model} --root {tmp_path}/models --tp 1"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    copy = Path(p.stdout.strip().splitlines()[-1])
    assert copy == tmp_path / "models" / "SmolLM2-135M-Instruct-tp1"
    assert [f.name for f in copy.glob("*.safetensors")] == ["model-rank-0-part-0.safetensors"]
    assert (copy / "tokenizer.json").is_file() and not list((tmp_path / "models").glob(".*staging*"))
    assert f"model.path={copy} model.load_format=sharded_state" in p.stderr
    run_launch(tmp_path, "cluster=debug", f"model.path={copy}", "model.load_format=sharded_state",
               "data=example_prompts", "data.limit=1", "sampling=greedy", "sampling.max_tokens=4")
    (row,) = read_results(next((tmp_path / "runs").iterdir()) / "results.jsonl")
    assert "Paris" in row["text"], row
