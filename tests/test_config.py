"""Configs: every shipped group composes and validates; bad settings are named."""

import re

import pytest

from conftest import ROOT, compose
from hpc_infer.errors import UserError

CONF = ROOT / "hpc_infer" / "conf"


def names(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("model", names("model"))
@pytest.mark.parametrize("sampling", names("sampling"))
def test_every_model_and_sampling_composes(model, sampling):
    pair = ["data.pair_field=document"] if "task: score" in (CONF / "model" / f"{model}.yaml").read_text() else []
    rc = compose(f"model={model}", f"sampling={sampling}", *pair)
    assert rc.model.name == model and rc.sampling.name == sampling


def test_score_task_needs_a_pair_field():
    with pytest.raises(UserError, match="data.pair_field: model.task=score compares"):
        compose("model=bge_reranker_score")


@pytest.mark.parametrize("cluster", names("cluster"))
def test_every_cluster_composes(cluster, tmp_path):
    overrides = [f"cluster={cluster}"]
    if cluster == "aau_ai_cloud":  # its image lives on that cluster only
        image = tmp_path / "vllm.sif"
        image.touch()
        overrides.append(f"cluster.container.image={image}")
    rc = compose(*overrides)
    assert rc.cluster.name == cluster


def test_shipped_values():
    rc = compose("model=qwen_math", "cluster=together", "data=math_r1_zero", "sampling=r1_zero")
    assert rc.model.local_paths == ["/data/a5-alignment/models/Qwen2.5-Math-1.5B"]
    assert rc.sampling.stop == ["</answer>"] and rc.sampling.include_stop_str_in_output
    assert rc.resolved_run_name == "math_r1_zero__qwen_math__r1_zero"
    assert compose("model=llama33_70b_instruct", "cluster.gpus_per_task=4").model.tensor_parallel_size == 4
    d = compose("model=qwen_math", "sampling=default").sampling  # no card defaults
    assert (d.temperature, d.top_p, d.max_tokens, d.stop) == (1.0, 1.0, 1024, ["\n"])


@pytest.mark.parametrize(
    "override, expect",
    [
        ("sampling.temperature=-1", "sampling.temperature: -1.0 must be >= 0"),
        ("sampling.top_p=0", "sampling.top_p"),
        ("sampling.max_tokens=0", "sampling.max_tokens"),
        ("cluster.workers=0", "cluster.workers"),
        ("model.task=embedz", "model.task: 'embedz'"),
        ("data.path=/nonexistent.jsonl", "data.path: /nonexistent.jsonl does not exist"),
        ("data.path=/proc/self", "data.path: /proc/self is a kernel or process file"),
        ("data.path=/usr/share/zoneinfo", "data.path: /usr/share/zoneinfo is a directory with no .parquet, .jsonl"),
        ("data.path=/dev/zero", "data.path: /dev/zero is a device"),
        ("merge.format=xml", "merge.format"),
        ("serve.router_policy=fastest", "serve.router_policy: 'fastest' is not one of round_robin"),
        ("serve.router_port=70000", "serve.router_port: must be in 1..65535"),
        ("serve.router_cpus=0", "serve.router_cpus: must be >= 1"),
        ("cluster.container.image=/no/such.sif", "cluster.container.image: image /no/such.sif does not exist"),
    ],
)
def test_bad_values_named(override, expect):
    with pytest.raises(UserError) as e:
        compose(override)
    assert expect in str(e.value)


def test_gpu_clusters_give_a_task_the_models_tp_x_pp_gpus():
    assert compose("model=llama33_70b_instruct", "cluster=together").cluster.gpus_per_task == 4
    rc = compose(
        "model=llama33_70b_instruct", "cluster=aau_ai_cloud", "cluster.nodes_per_task=2", "cluster.container.image=null"
    )
    assert (rc.cluster.gpus_per_task, rc.cluster.gres) == (2, "gpu:2")  # per node, over 2 nodes
    assert compose("model=qwen_math", "cluster=together").cluster.gpus_per_task == 1


def test_unknown_key_and_wrong_type_fail_in_hydra():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="temprature"):
        compose("sampling.temprature=0.5")
    with pytest.raises(ConfigCompositionException, match="max_tokens"):
        compose("sampling.max_tokens=lots")


@pytest.mark.parametrize(
    "override, expect",
    [
        ("serve.max_restarts=-1", "serve.max_restarts: must be >= 0 (0: a dead server is not restarted)"),
        ("serve.restart_backoff_s=-2", "serve.restart_backoff_s: must be >= 0"),
    ],
)
def test_watchdog_settings_are_checked(override, expect):
    with pytest.raises(UserError, match=re.escape(expect)):
        compose("cluster=local", override)


def test_model_card_sampling_defaults_fill_the_chat_and_default_groups():
    """model.sampling_defaults (what the model card recommends, as vLLM's server reads a
    generation config) fills sampling=chat/default; the command line and other groups win."""
    chat = compose("model=smollm2_cpu", "sampling=chat").sampling
    assert (chat.temperature, chat.top_p, chat.top_k) == (0.2, 0.9, 0)
    assert compose("model=smollm2_cpu", "sampling=chat", "sampling.temperature=0.7").sampling.temperature == 0.7
    assert compose("model=smollm2_cpu", "sampling=greedy").sampling.temperature == 0.0
    assert compose("model=qwen_math", "sampling=chat").sampling.temperature == 1.0  # no card defaults
    with pytest.raises(UserError, match=r"model.sampling_defaults: \['max_tokens'\] are not model-card sampling"):
        compose("model=smollm2_cpu", "+model.sampling_defaults.max_tokens=5")
