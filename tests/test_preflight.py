"""GPU pre-flight over real architectures: the shipped config.json numbers of each model
(tests/model_configs/*/config.json) against each cluster config, before submission."""

import json
import subprocess
from pathlib import Path

import pytest

from conftest import compose, user_env, require_slurm
from hpc_infer.errors import UserError
from hpc_infer.cluster.preflight import max_positions, preflight

CONFIGS = Path(__file__).parent / "model_configs"
MODELS = sorted(p.stem for p in (Path(__file__).parent.parent / "hpc_infer/conf/model").glob("*.yaml"))
CLUSTERS = sorted(p.stem for p in (Path(__file__).parent.parent / "hpc_infer/conf/cluster").glob("*.yaml"))


def _rc(model, cluster, *more):
    pair = ["data.pair_field=answer"] if model == "bge_reranker_score" else []
    return compose(
        f"model={model}",
        f"cluster={cluster}",
        f"model.path={CONFIGS / model}",
        "cluster.container.image=null",
        *pair,
        *more,
    )


def test_every_model_has_its_real_config():
    assert sorted(p.name for p in CONFIGS.iterdir()) == MODELS


# The verdict of every shipped model x cluster pair (a machine of 24 GiB for the local
# backends): every pair not listed fits. The CPU clusters refuse what does not fit in a
# task's memory (slurm_local: cluster.mem=4G) or this machine's.
REFUSED = {
    ("llama31_8b", "slurm_local"): "set cluster.mem=17G or more",
    ("llama32_1b_instruct", "slurm_local"): "set cluster.mem=5G or more",
    ("llama33_70b_instruct", "slurm_local"): "set cluster.mem=134G or more",
    ("llama33_70b_instruct", "local"): "this machine has 24 GiB for 1 worker: use a smaller model",
    ("llama33_70b_instruct", "debug"): "this machine has 24 GiB for 1 worker: use a smaller model",
    ("qwen_apeach_classify", "slurm_local"): "set cluster.mem=5G or more",
    ("qwen_math", "slurm_local"): "set cluster.mem=5G or more",
    ("smollm3_3b", "slurm_local"): "set cluster.mem=8G or more",
}


@pytest.mark.parametrize("cluster", CLUSTERS)
@pytest.mark.parametrize("model", MODELS)
def test_every_shipped_pair_gets_its_verdict(model, cluster):
    rc = _rc(model, cluster)
    expect = REFUSED.get((model, cluster))
    if expect:
        with pytest.raises(UserError) as e:
            preflight(rc.model, rc.cluster, CONFIGS / model, host_mem_gib=24)
        assert expect in str(e.value) and f"model {model} needs about" in str(e.value), str(e.value)
        return
    preflight(rc.model, rc.cluster, CONFIGS / model, host_mem_gib=24)
    if rc.cluster.backend == "slurm" and rc.cluster.gpus_per_task:
        assert rc.cluster.gpus_per_task == rc.model.tensor_parallel_size * rc.model.pipeline_parallel_size


def test_local_workers_share_this_machines_memory():
    rc = _rc("llama31_8b", "local", "cluster.workers=2")  # 2 x 17 GiB on a 24 GiB machine
    with pytest.raises(UserError, match="24 GiB for 2 workers: set cluster.workers=1"):
        preflight(rc.model, rc.cluster, CONFIGS / "llama31_8b", host_mem_gib=24)
    preflight(rc.model, rc.cluster, CONFIGS / "llama31_8b", host_mem_gib=64)


def test_slurm_memory_sizes():
    from hpc_infer.cluster.preflight import mem_gib

    assert [mem_gib(x) for x in ("40G", "512M", "4096", "1T", "2.5GB", "lots")] == [40, 0.5, 4, 1024, 2.5, None]


def test_layout_refusal_names_both_sides_and_the_fix():
    rc = _rc("llama33_70b_instruct", "aau_ai_cloud", "cluster.gres=gpu:1", "cluster.nodes_per_task=2")
    with pytest.raises(UserError) as e:
        preflight(rc.model, rc.cluster, CONFIGS / "llama33_70b_instruct")
    msg = str(e.value)
    assert (
        "model.tensor_parallel_size=4 × pipeline_parallel_size=1 needs 4 GPUs per task; cluster aau_ai_cloud gives "
        "1 (gres gpu:1) × nodes_per_task 2 = 2: set cluster.gres=gpu:2 (× nodes_per_task 2) or "
        "model.tensor_parallel_size=2"
    ) in msg


@pytest.mark.parametrize(
    "overrides, expect",
    [
        (["model.tensor_parallel_size=5"], "does not divide the model's 12 attention heads"),
        (["model.pipeline_parallel_size=40", "cluster.gpus_per_task=40"], "exceeds the model's 28 layers"),
        (["model.max_model_len=8192"], "model.max_model_len=8192 exceeds the model's maximum of 4096 positions"),
        (["model.dtype=bfloat16", "cluster.gpu_type=V100"], "set model.dtype=float16"),
        (["model.quantization=awq"], "the checkpoint has no quantization_config"),
    ],
)
def test_model_side_refusals(overrides, expect):
    rc = _rc("qwen_math", "together", *overrides)
    with pytest.raises(UserError) as e:
        preflight(rc.model, rc.cluster, CONFIGS / "qwen_math")
    assert expect in str(e.value)


def test_long_context_can_be_forced():
    rc = _rc("qwen_math", "together", "model.max_model_len=8192", "+cluster.env.VLLM_ALLOW_LONG_MAX_MODEL_LEN=1")
    preflight(rc.model, rc.cluster, CONFIGS / "qwen_math")


def test_quantization_must_match_the_checkpoint(tmp_path):
    cfg = json.loads((CONFIGS / "llama31_8b/config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    rc = compose("model=llama31_8b", "cluster=together", f"model.path={tmp_path}", "model.quantization=gptq")
    with pytest.raises(UserError) as e:
        preflight(rc.model, rc.cluster, tmp_path)
    assert "quantized with awq" in str(e.value) and "set model.quantization=awq or null" in str(e.value)
    rc = compose("model=llama31_8b", "cluster=together", f"model.path={tmp_path}", "model.quantization=awq")
    preflight(rc.model, rc.cluster, tmp_path)


def test_memory_estimate_names_more_gpus():
    # 70B in bf16 over 4 x 24 GiB cannot fit; over 4 x 80 GiB it does
    rc = _rc("llama33_70b_instruct", "together", "cluster.gpu_type=L4")
    with pytest.raises(UserError) as e:
        preflight(rc.model, rc.cluster, CONFIGS / "llama33_70b_instruct")
    assert "use more GPUs (model.tensor_parallel_size=8" in str(e.value) and "GiB of bfloat16 weights" in str(e.value)
    rc = _rc("llama33_70b_instruct", "together")
    preflight(rc.model, rc.cluster, CONFIGS / "llama33_70b_instruct")


def test_positions_follow_rope_scaling():
    assert max_positions({"max_position_embeddings": 32768, "rope_scaling": {"type": "yarn", "factor": 4}}) == 131072
    assert max_positions(json.loads((CONFIGS / "llama31_8b/config.json").read_text())) == 131072


@pytest.mark.slurm
@pytest.mark.parametrize(
    "model, cluster, nodes",
    [
        *[
            (m, c, 1)
            for m in ("qwen_math", "llama31_8b", "llama33_70b_instruct", "smollm3_3b")
            for c in ("together", "aau_ai_cloud")
        ],
        ("llama33_70b_instruct", "together", 2),
        ("llama33_70b_instruct", "aau_ai_cloud", 2),
    ],
)
def test_rendered_scripts_pass_sbatch_test_only(tmp_path, model, cluster, nodes):
    """The script of every GPU pair, through the real scheduler's --test-only (no GPUs run here)."""
    require_slurm()  # skip without Slurm; fail under HPC_INFER_REQUIRE_SLURM=1 (CI)
    data = tmp_path / "p.jsonl"
    data.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    p = subprocess.run(
        [
            "/bin/bash",
            "-c",
            'exec hpc-infer sbatch "$@"',
            "sbatch",
            f"model={model}",
            f"cluster={cluster}",
            f"model.path={CONFIGS / model}",
            f"data.path={data}",
            f"output_root={tmp_path}/runs",
            "cluster.partition=debug",
            "cluster.qos=null",
            "cluster.container.image=null",
            "cluster.mem=1G",
            "cluster.cpus_per_task=1",
            f"cluster.nodes_per_task={nodes}",
            "model.task=generate",
        ],
        cwd=tmp_path,
        env=user_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    script = Path(p.stdout.strip())
    body = script.read_text()
    if nodes > 1:
        assert "wait_for_ray" in body and "sleep 15" not in body
    t = subprocess.run(["sbatch", "--test-only", str(script)], capture_output=True, text=True, timeout=120)
    assert t.returncode == 0, t.stderr
