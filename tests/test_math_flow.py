"""The headline use case at a size that resembles real use, and a failing worker that says why.

72 MATH-style problems through the r1_zero template, SmolLM2 on vLLM's CPU build, with
per-record seeds: more prompt tokens in flight than two steps of vLLM's CPU default
budget (4096 tokens a step), so vLLM would split prompts over steps (chunked prefill),
which used to crash the CPU build ("CPU Generator does not use offset"; see
vllm_engine.cpu_scheduler_kwargs). Graded at merge by the r1_zero reward. (200 problems
until this round: 72 (about 9,100 prompt tokens) already puts that many tokens in flight, asserted below.)
"""

import json
import random
import re
import subprocess

import pytest

from conftest import read_results, run_launch, run_line, user_checkout, user_env
from doc_commands import as_written
from hpc_infer.rundir import read_json

pytestmark = pytest.mark.slow


def _problems(path, n):
    rng = random.Random(20261123)
    with open(path, "w") as f:
        for i in range(n):
            a, b = rng.randint(10, 999), rng.randint(10, 999)
            f.write(
                json.dumps(
                    {
                        "unique_id": f"gen/{i}",
                        "problem": f"Compute {a} + {b}. Show the carrying step by "
                        f"step, then check the sum by subtracting {b}.",
                        "answer": str(a + b),
                    }
                )
                + "\n"
            )


N = 72
CPU_STEP_TOKENS = 4096  # vLLM's default max_num_batched_tokens for LLM on CPU (engine/arg_utils.py)


def test_math_flow_seeded_on_cpu_more_prompt_tokens_than_steps_hold(tmp_path, cpu_model):
    data = tmp_path / "math.jsonl"
    _problems(data, N)
    p = run_launch(
        tmp_path,
        "data=math_r1_zero",
        "sampling=r1_zero",
        "sampling.max_tokens=8",
        f"data.path={data}",
        "data.id_field=unique_id",
        "cluster=local",
        timeout=1800,
    )
    run = tmp_path / "runs/math_r1_zero__smollm2_cpu__r1_zero"
    rows = read_results(run / "results.jsonl")
    assert [r["id"] for r in rows] == [f"gen/{i}" for i in range(N)]  # each once, in input order
    assert sum(r["prompt_tokens"] for r in rows) > 2 * CPU_STEP_TOKENS  # all in flight at once (16 chunks)
    assert all(r["output_tokens"] > 0 and "format_reward" in r and "answer_reward" in r for r in rows)
    summary = read_json(run / "summary.json")
    assert summary["records"] == N and summary["postprocess"]["records"] == N
    assert summary["postprocess"]["sums"]["answer_reward"] == sum(r["answer_reward"] for r in rows)
    # every record's reward is the grader's verdict on its own text and answer (the grader is
    # checked against the CS336 reference in test_math_grader.py) ...
    from hpc_infer.rewards.math_grader import r1_zero_score

    for r in rows:
        want = r1_zero_score(r["text"], r["fields"]["answer"], True)
        assert (r["format_reward"], r["answer_reward"]) == (want["format_reward"], want["answer_reward"]), r
    # ... and on known answers, through the same merge hook: a right one, a wrong one, no format
    from hpc_infer.rewards import r1_zero_reward

    known = [
        (" 12 </think> <answer> 1236 </answer>", "1236", 1.0, 1.0),
        (" x </think> <answer> 7 </answer>", "8", 1.0, 0.0),
        ("1236", "1236", 0.0, 0.0),
    ]
    for text, answer, fmt, ans in known:
        got = r1_zero_reward({"text": text, "outputs": [{"text": text}], "fields": {"answer": answer}})
        assert (got["format_reward"], got["answer_reward"]) == (fmt, ans), (text, got)
    assert f"summary: {run}/summary.json" in p.stderr and "timeline.png" in p.stderr
    # progress while it ran (a file, not a terminal: a line every 30 s and the last): tokens
    # counted as the engine makes them, an ETA that is a number of seconds or "--", never nan
    progress = [line for line in p.stderr.splitlines() if " records, " in line and "tok/s=" in line]
    assert progress and f"{N}/{N} records" in progress[-1], progress
    assert all(
        re.search(r": \d+/72 records, \d+/\d+ chunks, \d+s, tok/s=[\d,]+ ETA=(--|[\d,]+s) running=\d+ failed=0$", line)
        for line in progress
    ), progress
    spec = read_json(run / "worker.json")
    assert spec["seed"] == 0  # per-record seeds were on


def test_the_readme_worked_example_as_typed(tmp_path, cpu_model):
    """The README's CS336 flow on the bundled 20-problem sample, as typed in the checkout:
    four samples a problem, graded, pass@k/maj@k overall and by level, the report page."""
    here = user_checkout(tmp_path)
    line = as_written(
        ".venv/bin/hpc-infer launch data=math_r1_zero sampling.n=4 sampling.max_tokens=128 'merge.group_by=[level]'"
    )
    p = run_line(here, line, timeout=1800)
    assert p.returncode == 0, p.stderr[-5000:]
    run = here / "runs/math_r1_zero__smollm2_cpu__r1_zero"
    rows = read_results(run / "results.jsonl")
    assert len(rows) == 20 and all(len(r["outputs"]) == 4 for r in rows)
    metrics = read_json(run / "summary.json")["postprocess"]["metrics"]
    from hpc_infer.run.metrics import pass_at_k

    correct = [sum(o["answer_reward"] > 0 for o in r["outputs"]) for r in rows]
    assert metrics["records"] == 20 and metrics["samples_per_record"] == 4
    assert metrics["pass@1"]["mean"] == pytest.approx(sum(c / 4 for c in correct) / 20, abs=1e-6)
    assert metrics["pass@4"]["mean"] == pytest.approx(sum(pass_at_k(4, c, 4) for c in correct) / 20, abs=1e-6)
    assert {"maj@1", "maj@2", "maj@4"} <= set(metrics)
    assert sum(metrics["categories"].values()) == 80
    levels = sorted({r["fields"]["level"] for r in rows})
    by_level = metrics["groups"]["level"]
    assert sorted(by_level) == levels and sum(g["records"] for g in by_level.values()) == 20
    assert "pass@1 " in p.stderr and "(20 records)" in p.stderr  # the headline
    page = (run / "report.html").read_text()
    assert f"report: {run}/report.html" in p.stderr and all(level in page for level in levels)


def test_failing_worker_tells_the_user_why(tmp_path, cpu_model):
    p = run_launch(
        tmp_path,
        "data=example_prompts",
        "data.limit=2",
        "sampling.max_tokens=4",
        "cluster=local",
        env={"HPC_INFER_FAULT": "step:RAISE"},
        check=False,
        timeout=900,
    )
    assert p.returncode == 2, p.stderr[-3000:]
    assert "RuntimeError: injected fault at step" in p.stderr and "_log.err" in p.stderr
    assert "Traceback" not in p.stderr  # the launcher's own output; the worker's traceback is in its log
    run = tmp_path / "runs/example_prompts__smollm2_cpu__default"
    s = subprocess.run(
        ["/bin/bash", "-c", f"hpc-infer status {run}"],
        cwd=tmp_path,
        env=user_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert s.returncode == 0 and "failed" in s.stdout and "RuntimeError: injected fault at step" in s.stdout
