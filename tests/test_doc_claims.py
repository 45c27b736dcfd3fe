"""Every command and config key the README and docs/ mention is used by some test.

The checker reads the docs, keeps the dotted names that are real fields of the config
(so `serve.md` or `merge.py` are not mistaken for keys) and every `hpc-infer` subcommand,
and fails on one that no test file spells out. What cannot run here is listed in
NOT_HERE with the reason. Below it, small tests for keys that had none.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import re
import stat
from pathlib import Path

import pytest

from conftest import ROOT, compose
from hpc_infer import config
from hpc_infer.errors import UserError

TESTS = Path(__file__).parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Mentioned in the docs, not run by any test, and why.
NOT_HERE = {
    "model.engine_kwargs.x": "a placeholder in the docs' own example (model.engine_kwargs.X=...); "
    "model.engine_kwargs is tested",
}
GROUPS = {
    "cluster": config.ClusterConfig,
    "data": config.DataConfig,
    "model": config.ModelConfig,
    "sampling": config.SamplingConfig,
    "merge": config.MergeConfig,
    "serve": config.ServeConfig,
}


def _is_key(dotted: str) -> bool:
    group, field, *_ = dotted.split(".")
    return field in {f.name for f in dataclasses.fields(GROUPS[group])}


def _test_text() -> str:
    return "\n".join(p.read_text() for p in TESTS.glob("*.py"))


def documented_keys() -> dict[str, set[str]]:
    keys: dict[str, set[str]] = {}
    for doc in DOCS:
        for m in re.finditer(
            r"\b((?:cluster|data|model|sampling|merge|serve)\.[a-z_]+(?:\.[a-zA-Z_]+)?)\b", doc.read_text()
        ):
            if _is_key(m.group(1)):
                keys.setdefault(m.group(1), set()).add(doc.name)
    return keys


def documented_commands() -> dict[str, set[str]]:
    cmds: dict[str, set[str]] = {}
    for doc in DOCS:
        for m in re.finditer(r"hpc-infer ([a-z]+)(?: ([a-z]+)\b(?![=.]))?", doc.read_text()):
            sub = m.group(1) + (f" {m.group(2)}" if m.group(1) in ("serve", "cache", "image") and m.group(2) else "")
            cmds.setdefault(sub, set()).add(doc.name)
    return cmds


def test_every_documented_key_is_used_by_a_test():
    tests = _test_text()
    keys = documented_keys()
    assert len(keys) > 30  # the reader still finds the docs' keys
    missing = {k: sorted(d) for k, d in keys.items() if k not in tests and k.lower() not in NOT_HERE}
    assert not missing, f"documented but used by no test (add one, or say why in NOT_HERE): {missing}"


def test_every_documented_command_is_run_by_a_test():
    tests = _test_text()
    cmds = documented_commands()
    assert {"launch", "sbatch", "status", "merge", "cancel", "serve status", "cache stage"} <= set(cmds)
    missing = {}
    for cmd, docs in cmds.items():
        words = cmd.split()
        spelled = [f"hpc-infer {cmd}", ", ".join(f'"{w}"' for w in words)]
        if not any(s in tests for s in spelled):
            missing[cmd] = sorted(docs)
    assert not missing, f"documented commands no test runs: {missing}"


# Shown in a doc's shell block, not run by any test, and why. The doc says so too: the
# words "not run by the tests" in the block or in the lines just above it.
COMMANDS_NOT_HERE = {
    "hpc-infer launch model=qwen_math cluster=together data=math_r1_zero sampling=r1_zero": "Together's GPUs and shared model copy (the bundled 20-problem sample runs here: tests/test_math_flow.py)",
    "python -m hpc_infer.launch model=qwen_math cluster=together data=math_r1_zero sampling=r1_zero "
    "data.path=/data/a5-alignment/MATH/validation.jsonl cluster.workers=8": "Together's GPUs and its MATH copy",
    "hpc-infer tune model=qwen_math cluster=together data=math_r1_zero tune.budget_s=900": "a GPU cluster "
    "(tests/test_tune.py runs `hpc-infer tune` on the local Slurm)",
    "bash scripts/test.sh": "the test command itself; .ci/run runs it on a clean clone",
    "~/venvs/hpc_infer/bin/hpc-infer launch model=qwen_math cluster=together data=math_r1_zero "
    "cluster.container.image=/home/container/vllm-openai_latest.sif": "a GPU cluster and its vLLM image",
    "HPC_INFER_VENV=/shared/$USER/venvs/hpc_infer bash scripts/setup.sh --gpu": "downloads CUDA wheels; tests/test_install.py checks the [gpu] range against the registry's index",
    "/shared/$USER/venvs/hpc_infer/bin/hpc-infer launch model=llama31_8b cluster=aau_ai_cloud "
    "data.path=prompts.jsonl": "a GPU cluster",
    "hpc-infer launch model=llama31_8b cluster=aau_ai_cloud data.path=prompts.jsonl": "a GPU cluster",
    "hpc-infer serve model=llama31_8b cluster=aau_ai_cloud": "a GPU cluster",
    "hpc-infer serve model=qwen_math cluster=together serve.replicas=4": "a GPU cluster",
    "hpc-infer image pull docker://vllm/vllm-openai:v0.11.0 --dest /shared/images/vllm.sif": "Apptainer and a registry (--dry-run is tested)",
    "hpc-infer image build --dest /shared/images/vllm-hpc_infer.sif": "Apptainer with --fakeroot (--dry-run is "
    "tested; the %post steps run in a sandbox)",
    "hpc-infer image inspect /shared/images/vllm.sif": "a real SIF image (the header check is tested)",
    "srun --gres=gpu:4 hpc-infer cache shard Llama-3.1-70B --root /data/models --tp 4": "4 GPUs (tests/test_load_format.py shards the CPU model with --tp 1)",
    "singularity exec --nv /home/container/vllm-openai_latest.sif python3 basic.py": "the AI Cloud's image and GPUs",
    "sbatch runs/<run>/job.sbatch": "the AI Cloud's partitions (tests/test_slurm.py submits a rendered script to the "
    "local Slurm)",
    "hpc-infer launch model=qwen_math cluster=together data=math_r1_zero "
    "cluster.container.image=/shared/images/vllm.sif": "a GPU cluster and its image",
    "hpc-infer sbatch ... cluster.container.image=/shared/images/vllm.sif": "the cluster's image",
    "lm_eval --model local-chat-completions --tasks gsm8k --apply_chat_template "
    "--model_args model=meta-llama/Llama-3.1-8B,base_url=http://gpu-node-3:23456/v1/chat/completions": "lm-eval is not installed here (the real `openai` client is tested against a replica)",
    "hpc-infer launch model=llama31_70b model.path=/data/models/Llama-3.1-70B-tp4 model.load_format=sharded_state "
    "model.tensor_parallel_size=4 ...": "4 GPUs",
}


def _as_written_commands() -> set[str]:
    """The first argument of every as_written(...) call in the tests, read from their syntax
    trees (so the formatter's line breaks and implicitly joined literals do not matter)."""
    found = set()
    for path in TESTS.glob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", None) == "as_written"
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                found.add(node.args[0].value)
    return found


def test_every_shown_command_is_run_as_written_or_its_doc_says_why():
    """Each command of a doc's shell block is passed to doc_commands.as_written() by some
    test (placeholders filled in, the rest as printed), or is in COMMANDS_NOT_HERE and its
    doc says the tests do not run it."""
    from doc_commands import DOCS, shown

    asked = _as_written_commands()
    commands = shown()
    assert len(commands) > 40, len(commands)
    missing, unsaid, stale = {}, [], sorted(set(COMMANDS_NOT_HERE) - set(commands))
    lines = {doc.name: doc.read_text().splitlines() for doc in DOCS}
    for cmd, where in commands.items():
        if cmd in COMMANDS_NOT_HERE:
            for doc, start in where:
                doc_lines = lines[doc]  # `start` is the block's first line (1-based): its fence is start - 1
                end = next((i for i in range(start - 1, len(doc_lines)) if doc_lines[i] == "```"), len(doc_lines))
                if "not run by the tests" not in " ".join(" ".join(doc_lines[max(0, start - 17) : end]).split()):
                    unsaid.append(f"{doc}:{start}: {cmd}")
        elif cmd not in asked:
            missing[cmd] = where
    assert not stale, f"COMMANDS_NOT_HERE names commands no doc shows: {stale}"
    assert not missing, f"shown but run as written by no test (use doc_commands.as_written, or say why): {missing}"
    assert not unsaid, f"not run by the tests, and the doc does not say so: {unsaid}"


# -- keys that had no test -------------------------------------------------------------


def test_gpu_mem_gb_decides_the_memory_check():
    from hpc_infer.cluster.preflight import preflight

    configs = TESTS / "model_configs" / "llama33_70b_instruct"
    common = ("model=llama33_70b_instruct", "cluster=together", f"model.path={configs}", "cluster.container.image=null")
    rc = compose(*common, "cluster.gpu_mem_gb=24")
    with pytest.raises(UserError, match="use more GPUs"):
        preflight(rc.model, rc.cluster, configs)
    rc = compose(*common, "cluster.gpu_mem_gb=141")
    preflight(rc.model, rc.cluster, configs)


@pytest.mark.parametrize("where", ["HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "cluster.token_file"])
def test_token_sources_the_docs_name(tmp_path, monkeypatch, where):
    from hpc_infer.secrets import find_token

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no hub token file of the machine's
    value = "hf_" + os.urandom(8).hex()
    path = tmp_path / "token"
    path.write_text(value + "\n")
    path.chmod(0o600)
    if where == "HUGGING_FACE_HUB_TOKEN":
        monkeypatch.setenv(where, value)
    elif where == "HF_TOKEN_PATH":
        monkeypatch.setenv(where, str(path))
    token = find_token(str(path) if where == "cluster.token_file" else None)
    assert token is not None and token.value == value and where in token.source
    assert value not in repr(token)


def test_batch_defaults_run_brings_back_the_runs_sampling():
    from hpc_infer.worker.worker import run_sampling

    spec = {"input": {"format": "openai_batch"}, "sampling": {"temperature": 0.3}, "seed": 7}
    assert run_sampling(dict(spec, batch_defaults="server")) == (None, None)  # vLLM's server defaults
    assert run_sampling(dict(spec, batch_defaults="run")) == ({"temperature": 0.3}, 7)
    assert compose("data.batch_defaults=run").data.batch_defaults == "run"
    with pytest.raises(UserError, match="data.batch_defaults"):
        compose("data.batch_defaults=mine")


def test_worker_policies_reach_the_worker_spec(tmp_path):
    """cluster.max_backups, straggler_pacing and max_attempts are read by the worker from
    worker.json (worker/worker.py); max_resubmits by launch; bad values refused by name."""
    from hpc_infer.run.plan import plan_input, prepare
    from hpc_infer.rundir import read_json

    data = tmp_path / "in.jsonl"
    data.write_text('{"prompt": "a"}\n')
    rc = compose(
        "cluster=local",
        f"data.path={data}",
        f"output_root={tmp_path}",
        "cluster.max_backups=0",
        "cluster.straggler_pacing=false",
        "cluster.max_attempts=3",
        "cluster.max_resubmits=0",
    )
    assert rc.cluster.max_resubmits == 0
    with plan_input(rc) as planned:
        run, _ = prepare(rc, planned, "/models/m", "")
    spec = read_json(run.worker_spec)
    assert (spec["max_backups"], spec["straggler_pacing"], spec["max_attempts"]) == (0, False, 3)
    for bad, name in (
        ("cluster.max_attempts=0", "cluster.max_attempts"),
        ("cluster.max_resubmits=-1", "cluster.max_resubmits"),
        ("cluster.max_backups=-1", "cluster.max_backups"),
    ):
        with pytest.raises(UserError, match=name):
            compose(bad)


def test_serve_host_and_name_and_key_file(tmp_path):
    from hpc_infer.serve.batch_endpoint import resolve_endpoint
    from hpc_infer.serve.launch import bind_address

    assert bind_address(compose("cluster=local")) == "127.0.0.1"  # clients are on this machine
    assert bind_address(compose("cluster=slurm_local")) == "0.0.0.0"  # clients on other nodes
    assert bind_address(compose("cluster=slurm_local", "serve.host=10.1.2.3")) == "10.1.2.3"
    key = tmp_path / "key"
    key.write_text("sk-" + os.urandom(8).hex())
    key.chmod(0o644)
    urls = "cluster.endpoint=http://127.0.0.1:8000/v1"
    with pytest.raises(UserError, match="serve.api_key_file"):  # readable by others: refused
        resolve_endpoint(compose(urls, f"serve.api_key_file={key}", "serve.name=my-model"))
    key.chmod(0o600)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    got = resolve_endpoint(compose(urls, f"serve.api_key_file={key}", "serve.name=my-model"))
    assert got["model"] == "my-model" and got["key_file"] == str(key) and got["urls"] == ["http://127.0.0.1:8000/v1"]


def test_data_postprocess_is_the_default_grader_and_merge_postprocess_overrides_it():
    rc = compose("data=math_r1_zero")
    assert rc.data.postprocess["_target_"].endswith("r1_zero_reward") and rc.postprocess == rc.data.postprocess
    assert compose("data=math_r1_zero", "merge.postprocess={}").postprocess is None  # turned off
    # merge.allow_partial: the merge of what is done (tests/test_merge.py runs that merge itself)
    assert compose("merge.allow_partial=true").merge.allow_partial is True


def test_a_doc_command_counts_as_run_only_once_a_shell_ran_its_line(tmp_path):
    """The observer's record comes from the bash that ran the line (tests/doc_observer.sh),
    not from the test asking for it: asked and not run is not observed; run, it is."""
    from conftest import DOC_RAN, _ran_since, sh
    from doc_commands import as_written

    start = DOC_RAN.stat().st_size if DOC_RAN.exists() else 0
    line = as_written("hpc-infer status runs/<run>", {"runs/<run>": str(tmp_path / "no-run")})
    assert not any(line in r for r in _ran_since(start))
    p = sh(tmp_path, line)
    assert p.returncode == 2 and "no-run" in p.stderr, p.stderr
    assert any(line in r for r in _ran_since(start))
