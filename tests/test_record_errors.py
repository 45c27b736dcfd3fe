"""A record the engine refuses is that record's error, never the run's (real vLLM, CPU build).

Every class of refusal vLLM raises when a request is added (prompt over max_model_len,
a sampling value, a JSON schema / regex / grammar that does not compile, a chat
template's input error, a model name the run does not serve, an embedding input too
long) becomes an error record in its chunk; the other records complete; the merge keeps
every record exactly once and lists the failures in errors.jsonl, itself a valid input.
Runs are launched in this process (cluster=debug), so each model loads once for the file
(and is shared with test_tasks_and_formats.py when both run in one session).
"""

from __future__ import annotations

import json
import subprocess

import pytest

from conftest import BIN, compose, read_results, user_env
from hpc_infer.launch import launch
from hpc_infer.errors import RecordsFailed

pytestmark = pytest.mark.slow

LONG = "hello " * 2100  # > max_model_len=2048 tokens of SmolLM2 after any template


def _launch(tmp_path, rows, *overrides, name="in.jsonl", run_name="r"):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / name
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return launch(
        compose(
            "cluster=debug", f"data.path={data}", f"output_root={tmp_path / 'runs'}", f"run_name={run_name}", *overrides
        ),
        "",
    )


def _batch_line(cid, body, url="/v1/chat/completions"):
    return {"custom_id": cid, "method": "POST", "url": url, "body": body}


def _chat(text, **kw):
    return dict({"messages": [{"role": "user", "content": text}], "max_tokens": 4, "temperature": 0}, **kw)


# One line per class of refusal, with the status vLLM's server gives it and a word of its message.
BAD_LINES = {
    "too_long": (_chat(LONG), 400, "maximum context length"),
    "neg_temperature": (_chat("hi", temperature=-1), 400, "temperature"),
    "bad_top_p": (_chat("hi", top_p=7), 400, "top_p"),
    "bad_schema": (
        _chat(
            "hi", response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
        ),
        400,
        "nonsense",
    ),
    "bad_regex": (_chat("hi", guided_regex="([a-z"), 400, "regex"),
    "bad_grammar": (_chat("hi", guided_grammar="root ::= ("), 400, "grammar"),
    "bad_content": ({"messages": [{"role": "user", "content": 5}], "max_tokens": 4}, 400, ""),
    "other_model": (_chat("hi", model="gpt-17"), 404, "gpt-17"),
}


def test_every_refusal_class_is_one_error_line_in_run_batch_shape(tmp_path):
    from vllm.entrypoints.launchers.run_batch import BatchRequestOutput

    lines = [_batch_line("ok_first", _chat("Say hi"))]
    lines += [_batch_line(cid, body) for cid, (body, _, _) in BAD_LINES.items()]
    lines += [_batch_line("ok_last", _chat("Say bye"))]
    s = _launch(tmp_path, lines, "merge.format=openai_batch", "chunks_per_worker=2", "data.too_long=mark")
    out = read_results(tmp_path / "runs" / "r" / "results.openai_batch.jsonl")  # each format its own file
    assert [o["custom_id"] for o in out] == [line["custom_id"] for line in lines]  # each exactly once, in order
    for o in out:
        BatchRequestOutput.model_validate(o)  # vLLM's own model of a batch output line
    by_id = {o["custom_id"]: o for o in out}
    for cid in ("ok_first", "ok_last"):
        assert by_id[cid]["response"]["status_code"] == 200 and by_id[cid]["error"] is None
        assert by_id[cid]["response"]["body"]["choices"][0]["message"]["content"]
    for cid, (_, status, word) in BAD_LINES.items():
        o = by_id[cid]
        assert o["response"]["status_code"] == status and o["response"]["body"] is None, o
        assert o["error"]["error"]["code"] == status and word.lower() in o["error"]["error"]["message"].lower(), o
    assert s.errors == len(BAD_LINES) and sum(s.error_types.values()) == len(BAD_LINES)
    assert s.error_types["TooLong"] == 1  # found at plan time; the others refused by the engine
    assert s.error_types["VLLMValidationError"] == 5 and s.error_types["ModelNotServed"] == 1
    summary = json.loads((tmp_path / "runs" / "r" / "summary.json").read_text())
    assert summary["errors"] == len(BAD_LINES) and summary["on_error"] == "keep"
    # errors.jsonl: the failed lines as written, with line numbers, and a valid input file again
    errs = read_results(tmp_path / "runs" / "r" / "errors.jsonl")
    assert [e["custom_id"] for e in errs] == list(BAD_LINES)
    assert [e["_hpc_infer_error"]["line"] for e in errs] == list(range(2, 2 + len(BAD_LINES)))
    assert all(e["body"] == BAD_LINES[e["custom_id"]][0] for e in errs)
    again = _launch(
        tmp_path / "again",
        [],
        "data.path=" + str(tmp_path / "runs" / "r" / "errors.jsonl"),
        "merge.format=openai_batch",
        "data.too_long=mark",
        name="unused.jsonl",
    )
    assert again.errors == len(BAD_LINES) and again.records_expected == len(BAD_LINES)


def test_one_prompt_too_long_among_six_loses_nothing(tmp_path):
    rows = [{"id": f"p{i}", "prompt": LONG if i == 3 else f"Question {i}: what is {i} plus {i}?"} for i in range(6)]
    s = _launch(tmp_path, rows, "sampling=greedy", "sampling.max_tokens=4", "chunks_per_worker=1", "data.too_long=mark")
    out = read_results(tmp_path / "runs" / "r" / "results.jsonl")
    assert [r["id"] for r in out] == [f"p{i}" for i in range(6)]
    assert [bool(r.get("error")) for r in out] == [False, False, False, True, False, False]
    assert out[3]["error"]["type"] == "TooLong" and out[3]["line"] == 4 and out[3]["outputs"] == []
    assert all(r["outputs"][0]["finish_reason"] in ("length", "stop") for i, r in enumerate(out) if i != 3)
    assert s.error_types == {"TooLong": 1}
    errs = read_results(tmp_path / "runs" / "r" / "errors.jsonl")
    assert errs == [dict(rows[3], _hpc_infer_error=errs[0]["_hpc_infer_error"])]
    assert errs[0]["_hpc_infer_error"]["line"] == 4

    # merge policies through the console script, as a user runs them
    run = tmp_path / "runs" / "r"
    env = user_env()
    drop = subprocess.run(
        ["bash", "-c", 'exec hpc-infer merge "$1" --on-error drop', "x", str(run)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert drop.returncode == 0 and "1 of 6 records failed" in drop.stderr, drop.stderr
    assert [r["id"] for r in read_results(run / "results.jsonl")] == ["p0", "p1", "p2", "p4", "p5"]
    fail = subprocess.run(
        ["bash", "-c", 'exec hpc-infer merge "$1" --on-error fail', "x", str(run)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert fail.returncode == 3 and "merge.on_error=fail" in fail.stderr and "errors.jsonl" in fail.stderr, fail.stderr
    assert len(read_results(run / "results.jsonl")) == 6  # written in full before the exit code says it


def test_on_error_fail_exits_3_through_launch(tmp_path):
    rows = [{"id": "a", "prompt": "Hi"}, {"id": "b", "prompt": LONG}]
    with pytest.raises(RecordsFailed) as e:
        _launch(tmp_path, rows, "sampling=greedy", "sampling.max_tokens=2", "merge.on_error=fail", "data.too_long=mark")
    assert e.value.exit_code == 3 and "1 of 2 records failed (1 TooLong)" in str(e.value)


def test_embedding_input_too_long_is_its_records_error(tmp_path):
    rows = [
        {"id": "short", "prompt": "A cat sat on a mat."},
        {"id": "long", "prompt": "cat " * 1200},
        {"id": "short2", "prompt": "Stocks fell."},
    ]
    s = _launch(tmp_path, rows, "model=minilm_cpu", "data.too_long=mark")
    out = read_results(tmp_path / "runs" / "r" / "results.jsonl")
    assert [r["id"] for r in out] == ["short", "long", "short2"]
    assert len(out[0]["embedding"]) == 384 and len(out[2]["embedding"]) == 384
    assert out[1]["error"] and "embedding" not in out[1] and s.errors == 1


# Answers that span several lines, so a leaked run default (stop "\n") would cut them.
MULTILINE = [
    "Count from 1 to 6, one number per line.",
    "List three colours, one per line.",
    "Write two short lines about the sea.",
]


def test_openai_batch_lines_mean_what_they_mean_to_vllm_run_batch(tmp_path, cpu_model):
    """The same chat batch through `vllm run-batch` and through us, greedy, no stop in any
    body: texts, finish reasons and usage agree line by line (no run default leaks in)."""
    lines = [
        _batch_line(f"q{i}", {"messages": [{"role": "user", "content": q}], "max_tokens": 24, "temperature": 0})
        for i, q in enumerate(MULTILINE)
    ]
    lines.append(
        _batch_line(
            "no_max",
            {"messages": [{"role": "user", "content": "Say OK."}], "temperature": 0, "max_completion_tokens": 12},
        )
    )
    batch = tmp_path / "batch.jsonl"
    batch.write_text("".join(json.dumps(line) + "\n" for line in lines))
    ref_out = tmp_path / "run_batch.jsonl"
    env = user_env(
        {
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "VLLM_CPU_OMP_THREADS_BIND": "nobind",
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "HF_HUB_OFFLINE": "1",
        }
    )
    p = subprocess.run(
        [
            str(BIN / "python"),
            "-m",
            "vllm.entrypoints.openai.run_batch",
            "-i",
            str(batch),
            "-o",
            str(ref_out),
            "--model",
            cpu_model,
            "--served-model-name",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "--dtype",
            "float32",
            "--enforce-eager",
            "--max-model-len",
            "2048",
            "--no-enable-chunked-prefill",
            "--max-num-batched-tokens",
            "2048",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=900,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    ref = {o["custom_id"]: o for o in read_results(ref_out)}
    s = _launch(tmp_path / "ours", lines, f"data.path={batch}", "merge.format=openai_batch")
    ours = {o["custom_id"]: o for o in read_results(tmp_path / "ours" / "runs" / "r" / "results.openai_batch.jsonl")}
    assert "vLLM's OpenAI-server defaults" in s.sampling["per_line"]
    multiline = 0
    for cid, want in ref.items():
        got = ours[cid]
        assert want["response"]["status_code"] == got["response"]["status_code"] == 200
        wc, gc = want["response"]["body"]["choices"][0], got["response"]["body"]["choices"][0]
        assert gc["message"]["content"] == wc["message"]["content"], cid
        assert (gc["finish_reason"], gc["stop_reason"]) == (wc["finish_reason"], wc["stop_reason"]), cid
        counts = ("prompt_tokens", "completion_tokens", "total_tokens")
        assert [got["response"]["body"]["usage"][k] for k in counts] == [
            want["response"]["body"]["usage"][k] for k in counts
        ], cid
        multiline += "\n" in wc["message"]["content"]
    assert multiline >= 2  # the comparison covered answers a stop at "\n" would have cut


def test_records_that_cannot_fit_are_found_at_plan_time_with_their_lines(tmp_path):
    """prompt + max_tokens over max_model_len (2048): `error` refuses before anything runs,
    naming each line; `mark` makes them error records; `truncate` keeps a plain prompt's
    last tokens. Only long records are tokenized (a token covers at least one byte)."""
    from hpc_infer.errors import UserError

    rows = [
        {"id": "a", "prompt": "Hi"},
        {"id": "b", "prompt": "word " * 1900},
        {"id": "c", "prompt": "Bye"},
        {"id": "d", "prompt": "x " * 3000},
    ]
    with pytest.raises(UserError) as e:
        _launch(tmp_path / "err", rows, "sampling=greedy", "sampling.max_tokens=200")
    msg = str(e.value)
    assert "2 records cannot fit" in msg and "in.jsonl line 2: prompt" in msg and "in.jsonl line 4: prompt" in msg
    assert "max_tokens 200 > max_model_len 2048" in msg and "data.too_long=mark" in msg
    assert not (tmp_path / "err" / "runs" / "r").exists()

    s = _launch(tmp_path / "mark", rows, "sampling=greedy", "sampling.max_tokens=200", "data.too_long=mark")
    out = read_results(tmp_path / "mark" / "runs" / "r" / "results.jsonl")
    assert [bool(r.get("error")) for r in out] == [False, True, False, True] and s.error_types == {"TooLong": 2}
    assert "found at plan time" in out[1]["error"]["message"] and out[1]["line"] == 2

    # a stop at the first space: the truncation depends on max_tokens, not on the tokens made
    # (200 tokens decoded over 1848-token contexts cost about a minute on this CPU)
    s = _launch(
        tmp_path / "cut",
        rows,
        "sampling=greedy",
        "sampling.max_tokens=200",
        "data.too_long=truncate",
        'sampling.stop=[" "]',
    )
    out = read_results(tmp_path / "cut" / "runs" / "r" / "results.jsonl")
    assert s.errors == 0 and [r.get("truncated_to") for r in out] == [None, 1848, None, 1848]
    assert out[1]["prompt_tokens"] == 1848 and out[1]["outputs"][0]["finish_reason"] in ("length", "stop")
