"""The malformed-input corpus: every case is refused before anything is submitted.

Each case is a prompt file (or none) plus overrides, run through the same `launch()`
the command line runs, on the `local` backend with wait=false: if validation missed a
case, real workers would be submitted and jobs.json written, and the test fails. Each
message must name the file and line, or the setting, that is wrong. Cases Hydra itself
rejects (unknown keys, wrong types, unknown group options) go through the real command
line, which must print no traceback.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import compose, run_launch
from hpc_infer.errors import UserError
from hpc_infer.launch import launch

OK = '{"prompt": "hello"}\n'
CHAT = '{"messages": [{"role": "user", "content": "hi"}]}\n'

# name: (file name, file content (str | bytes | None for "no file"), overrides, expected text in the message)
CORPUS = {
    # --- the prompt file: named by path and line
    "invalid JSON": ("in.jsonl", OK + '{"prompt": \n', [], "line 2: invalid JSON"),
    "truncated last line": ("in.jsonl", OK * 3 + '{"prompt": "cut', [], "line 4: invalid JSON"),
    "latin-1 byte": ("in.jsonl", b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n', [], "line 2: not valid UTF-8"),
    "UTF-16 file": ("in.jsonl", OK.encode("utf-16"), [], "line 1: not valid UTF-8"),
    "missing prompt field": ("in.jsonl", OK + '{"text": "b"}\n', [], "line 2: no 'prompt' or 'messages' field"),
    "empty prompt": ("in.jsonl", OK + '{"prompt": ""}\n', [], "line 2: 'prompt' is empty"),
    "prompt is a number": ("in.jsonl", '{"prompt": 5}\n', [], "line 1: 'prompt' must be a string"),
    "prompt is null": ("in.jsonl", OK + '{"prompt": null}\n', [], "line 2: 'prompt' must be a string"),
    "row is a list": ("in.jsonl", "[1, 2]\n", [], "line 1: expected a JSON object"),
    "duplicate ids": (
        "in.jsonl",
        '{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n',
        [],
        "line 2: duplicate id '1'",
    ),
    "id missing later": ("in.jsonl", '{"id": "a", "prompt": "x"}\n{"prompt": "y"}\n', [], "line 2: has no 'id' field"),
    "messages not a list": ("in.jsonl", '{"messages": "hi"}\n', [], "line 1: 'messages' must be a non-empty list"),
    "message without role": (
        "in.jsonl",
        CHAT + '{"messages": [{"content": "x"}]}\n',
        [],
        "line 2: 'messages' must be a non-empty list",
    ),
    "empty messages": ("in.jsonl", '{"messages": []}\n', [], "line 1: 'messages' must be a non-empty list"),
    "prompts mixed with chat": ("in.jsonl", OK + CHAT, [], "mixes plain prompts and chat"),
    "empty file": ("in.jsonl", "", [], "no records"),
    "only blank lines": ("in.jsonl", "\n \n\n", [], "no records"),
    "huge line": (
        "in.jsonl",
        OK * 2 + json.dumps({"prompt": "x" * 5000}) + "\n",
        ["data.max_line_bytes=1000"],
        "line 3: longer than data.max_line_bytes=1000 bytes",
    ),
    "template names a missing field": (
        "in.jsonl",
        OK,
        ["data.template='{prompt} {solution}'"],
        "line 1: template data.template uses {solution}",
    ),
    "template with a lone brace": ("in.jsonl", OK, ["data.template='{prompt} {'"], "write literal braces"),
    "csv without the prompt column": ("in.csv", "id,question\nq1,What?\n", [], "line 2: no 'prompt' or 'messages'"),
    "garbage parquet": ("in.parquet", b"PAR1 not really", [], "not a readable parquet file"),
    "unknown extension": ("in.xml", "<prompts/>", [], "cannot tell the format from the file name"),
    "input file missing": (
        None,
        None,
        ["data.path=/nonexistent/prompts.jsonl"],
        "data.path: /nonexistent/prompts.jsonl does not exist",
    ),
    "template file missing": (
        "in.jsonl",
        OK,
        ["data.template_file=/nonexistent.prompt"],
        "data.template_file: /nonexistent.prompt does not exist",
    ),
    # --- settings: named by key, with the allowed range
    "negative temperature": ("in.jsonl", OK, ["sampling.temperature=-1"], "sampling.temperature: -1.0 must be >= 0"),
    "top_p above 1": ("in.jsonl", OK, ["sampling.top_p=1.5"], "sampling.top_p: 1.5 must be in (0, 1]"),
    "zero max_tokens": ("in.jsonl", OK, ["sampling.max_tokens=0"], "sampling.max_tokens: 0 must be >= 1"),
    "zero n": ("in.jsonl", OK, ["sampling.n=0"], "sampling.n: 0 must be >= 1"),
    "min_tokens over max_tokens": (
        "in.jsonl",
        OK,
        ["sampling.max_tokens=10", "sampling.min_tokens=100"],
        "sampling.min_tokens: must be in [0, max_tokens]",
    ),
    "negative top_k": ("in.jsonl", OK, ["sampling.top_k=-5"], "sampling.top_k: -5 must be >= 0"),
    "presence penalty out of range": (
        "in.jsonl",
        OK,
        ["sampling.presence_penalty=3"],
        "sampling.presence_penalty: must be in [-2, 2]",
    ),
    "zero repetition penalty": (
        "in.jsonl",
        OK,
        ["sampling.repetition_penalty=0"],
        "sampling.repetition_penalty: must be > 0",
    ),
    "model path missing": (
        "in.jsonl",
        OK,
        ["model.path=/nonexistent/model"],
        "model.path=/nonexistent/model: no model",
    ),
    "model path without config.json": ("in.jsonl", OK, ["model.path={tmp}"], "no config.json"),
    "container image missing": (
        "in.jsonl",
        OK,
        ["cluster.container.image=/nonexistent/vllm.sif"],
        "cluster.container.image: image /nonexistent/vllm.sif does not exist",
    ),
    "unknown container runtime": (
        "in.jsonl",
        OK,
        ["cluster.container.runtime=docker"],
        "cluster.container.runtime: 'docker' is not one of",
    ),
    "zero workers": ("in.jsonl", OK, ["cluster.workers=0"], "cluster.workers: 0 must be >= 1"),
    "time limit in hours": ("in.jsonl", OK, ["cluster.time=4h"], "cluster.time: 4h: not a Slurm time"),
    "memory not a size": ("in.jsonl", OK, ["cluster.mem=lots"], "cluster.mem: 'lots' is not a Slurm memory size"),
    "unknown dtype": ("in.jsonl", OK, ["model.dtype=fp8x"], "model.dtype: 'fp8x' is not one of"),
    "gpu memory over 1": (
        "in.jsonl",
        OK,
        ["model.gpu_memory_utilization=1.5"],
        "model.gpu_memory_utilization: 1.5 must be in (0, 1]",
    ),
    "max_tokens fills the context": (
        "in.jsonl",
        OK,
        ["model.max_model_len=512", "sampling.max_tokens=1024"],
        "sampling.max_tokens: 1024 leaves no room for the prompt",
    ),
    "token in the config": ("in.jsonl", OK, ["+cluster.env.HF_TOKEN=hf_x"], "cluster.env.HF_TOKEN: secrets do not"),
    "multi-node via launch": (
        "in.jsonl",
        OK,
        ["cluster.nodes_per_task=2"],
        "a model across nodes needs Slurm allocations",
    ),
    "unknown merge format": ("in.jsonl", OK, ["merge.format=xml"], "merge.format: 'xml' is not one of"),
    "zero chunks per worker": ("in.jsonl", OK, ["chunks_per_worker=0"], "chunks_per_worker: must be >= 1"),
    "unknown backend": ("in.jsonl", OK, ["cluster.backend=kubernetes"], "cluster.backend: 'kubernetes' is not one of"),
    "unknown task": ("in.jsonl", OK, ["model.task=dance"], "model.task: 'dance' is not one of"),
    "slash in run name": ("in.jsonl", OK, ["run_name=a/b"], "run_name: 'a/b' must be one plain name"),
    "dot-dot run name": ("in.jsonl", OK, ["run_name=.."], "run_name: '..' must be one plain name"),
    "dot run name": ("in.jsonl", OK, ["run_name=."], "run_name: '.' must be one plain name"),
    "run name with a space": ("in.jsonl", OK, ["run_name='my run'"], "run_name: 'my run' must be one plain name"),
    "unwritable output root": ("in.jsonl", OK, ["output_root=/proc/runs"], "output_root: /proc/runs is not writable"),
    "bad permissions": ("in.jsonl", OK, ["permissions=public"], "permissions: 'public' is not one of"),
    "group permissions without a group": ("in.jsonl", OK, ["permissions=group"], "run_group: permissions=group needs"),
    "device as input": ("", "", ["data.path=/dev/zero"], "data.path: /dev/zero is a device"),
    # --- checked against the installed vLLM and the task
    "SamplingParams field vLLM lacks": (
        "in.jsonl",
        OK,
        ["+sampling.extra.best_of=2"],
        "best_of is not a SamplingParams field in vLLM",
    ),
    "vLLM refuses a value": ("in.jsonl", OK, ["sampling.logprobs=-3"], "refuses these settings: logprobs must be"),
    "structured output typo": (
        "in.jsonl",
        OK,
        ["sampling.structured={regexp: 'a+'}"],
        "sampling.structured.regexp: unknown; give exactly one of",
    ),
    "two structured constraints": (
        "in.jsonl",
        OK,
        ["sampling.structured={regex: 'a+', choice: [x, y]}"],
        "sampling.structured: give exactly one of",
    ),
    "score without a pair field": (
        "in.jsonl",
        OK,
        ["model=minilm_cpu", "model.task=score"],
        "data.pair_field: model.task=score compares",
    ),
    "pair field missing in a record": (
        "in.jsonl",
        '{"prompt": "a", "doc": "b"}\n{"prompt": "c"}\n',
        ["model=minilm_cpu", "model.task=score", "data.pair_field=doc"],
        "line 2: data.pair_field 'doc' must be a non-empty string",
    ),
    "LoRA adapter missing": (
        "in.jsonl",
        OK,
        ["model.lora_path=/nonexistent/adapter"],
        "model.lora_path: /nonexistent/adapter has no adapter_config.json",
    ),
    "unloadable merge hook": (
        "in.jsonl",
        OK,
        ["merge.postprocess={_target_: nosuch.fn}"],
        "merge.postprocess._target_=nosuch.fn: cannot be loaded",
    ),
    "OpenAI batch: unknown url": (
        "in.jsonl",
        '{"custom_id": "a", "url": "/v1/images", "body": {}}\n',
        [],
        "line 1: url '/v1/images' is not one of",
    ),
    "OpenAI batch: unsupported body field": (
        "in.jsonl",
        '{"custom_id": "a", "url": "/v1/chat/completions", "body": {"messages": '
        '[{"role": "user", "content": "hi"}], "tools": []}}\n',
        [],
        "line 1: body field(s) tools are not supported",
    ),
    # A request body vLLM refuses is that line's error (as in `vllm run-batch`), not the run's:
    # tests/test_record_errors.py covers it.
}


def _write(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif name.endswith(".parquet") and not isinstance(content, bytes):
        pq.write_table(pa.Table.from_pylist(content), path)
    else:
        path.write_text(content)
    return path


@pytest.mark.parametrize("case", list(CORPUS))
def test_refused_before_submission_with_file_line_or_setting(tmp_path, case):
    name, content, overrides, expected = CORPUS[case]
    overrides = [o.replace("{tmp}", str(tmp_path)) for o in overrides]
    base = ["cluster=local", "wait=false", f"output_root={tmp_path / 'runs'}"]
    path = _write(tmp_path, name, content) if name else None
    if path:
        base.append(f"data.path={path}")
    with pytest.raises(UserError) as e:
        launch(compose(*base, *overrides), "")
    message = str(e.value)
    assert expected in message, message
    if path and "line" in expected:
        assert str(path) in message  # the file is named, not only the line
    assert not list((tmp_path / "runs").rglob("jobs.json"))  # nothing was submitted


def test_the_corpus_is_as_big_as_the_readme_says():
    import re

    from conftest import ROOT

    said = re.search(r"a (\d+)-case corpus", (ROOT / "README.md").read_text())
    assert said and int(said.group(1)) == len(CORPUS) >= 30, (said and said.group(0), len(CORPUS))


@pytest.mark.parametrize(
    "override, expected",
    [
        ("sampling.temprature=0.5", "sampling.temprature: unknown setting; did you mean sampling.temperature?"),
        ("cluster.workers=many", "cluster.workers=many: must be a whole number, e.g. cluster.workers=1"),
        ("sampling.temperature=hot", "sampling.temperature=hot: must be a number, e.g. sampling.temperature=1.0"),
        ("cluster.straggler_pacing=maybe", "cluster.straggler_pacing=maybe: must be true or false"),
        ("model=gpt5", "model=gpt5: no such model config"),
    ],
)
def test_what_hydra_would_refuse_gets_our_message_and_exit_2(tmp_path, override, expected):
    """A misspelt key, a word where a number or boolean belongs, an unknown group option:
    our `error:` line naming the setting and the fix, exit 2 (Hydra's own would exit 1)."""
    p = run_launch(tmp_path, override, "cluster=local", "wait=false", check=False, timeout=600)
    assert p.returncode == 2 and expected in p.stderr, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr and "HYDRA_FULL_ERROR" not in p.stderr
    assert not (tmp_path / "runs").exists()


def test_a_record_without_the_field_the_merge_hook_needs_is_refused_at_plan_time(tmp_path):
    data = tmp_path / "math.jsonl"
    data.write_text('{"unique_id": "a", "problem": "1+1?", "answer": "2"}\n{"unique_id": "b", "problem": "2+2?"}\n')
    with pytest.raises(UserError) as e:
        launch(
            compose(
                "data=math_r1_zero",
                f"data.path={data}",
                "cluster=local",
                "wait=false",
                f"output_root={tmp_path / 'runs'}",
            ),
            "",
        )
    msg = str(e.value)
    assert f"{data} line 2: no 'answer' field, which merge.postprocess hpc_infer.rewards.r1_zero_reward needs" in msg
    assert "merge.postprocess={}" in msg and not (tmp_path / "runs").exists()
    # the hook pointed at another field, or turned off: planned
    for override in (
        "merge.postprocess={_target_: hpc_infer.rewards.r1_zero_reward, answer_field: unique_id}",
        "merge.postprocess={}",
    ):
        rc = compose("data=math_r1_zero", f"data.path={data}", override, f"output_root={tmp_path / 'runs'}")
        from hpc_infer.run.plan import plan_input

        with plan_input(rc) as planned:
            assert planned.n_records == 2
