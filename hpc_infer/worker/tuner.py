"""Inside `hpc-infer tune`'s job: time engine settings on a sample of the run's own prompts.

Each setting runs in a process of its own (`python -m hpc_infer.worker.tuner ONE DIR K`),
so one engine's memory, threads or a build's refusal never leak into the next: the
engine is built and warmed up (not timed), then the sample is generated `repeats` times,
each timed from the first request in to the last result out, with vLLM's prefix cache
emptied before each (a repeat must not find its own prompts cached). A setting's outputs are
checked to be valid (every record back, no error the defaults did not have, tokens
generated). The driver (`run_tune`) tries the defaults first, then one change at a time,
until the budget would be overrun; then it times the grid's leader again right after the
defaults again (the confirmation: a machine's load that changed during the grid moves both
alike), and writes tune.json. Standard library + vLLM only.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def candidates(spec: dict) -> list[dict]:
    """The grid, defaults first: one engine setting changed at a time (what a model's config
    suggests comes with the spec: its own max_model_len bounds max_num_batched_tokens)."""
    kw = spec["model"]["engine_kwargs"]
    longest = int(kw.get("max_model_len") or 2048)
    grid: list[dict] = [{}]
    for seqs in (32, 64, 128):
        grid.append({"max_num_seqs": seqs})
    grid.append({"max_num_batched_tokens": 2 * max(longest, 2048)})
    grid.append({"enable_prefix_caching": False})
    grid.append({"speculative_config": {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}})
    return grid


def one(tune_dir: Path, k: int) -> dict:
    """Build the engine with setting k, warm it, time the sample `repeats` times (the fake
    engine when HPC_INFER_FAKE_ENGINE is set, as for a worker: tests of the loop itself)."""
    from ..rundir import faults
    from .worker import make_engine

    spec = json.loads((tune_dir / "tune_spec.json").read_text())
    setting = spec["grid"][k]
    faults.point("tune_setting", f"setting-{k}")
    model = dict(spec["model"], engine_kwargs=dict(spec["model"]["engine_kwargs"], **setting))
    t0 = time.perf_counter()
    engine = make_engine({"model": model})  # a fresh process: its own engine, as a worker's
    start_s = time.perf_counter() - t0
    records, sampling, seed = spec["records"], spec["sampling"], spec.get("seed")
    _generate(engine, records[:1], sampling, seed)  # warm-up: not timed
    runs = []
    for _ in range(int(spec["repeats"])):
        # each repeat cold: the same prompts again would all be found in vLLM's prefix cache, which
        # misjudges the noise and every prefill-bound setting (the run's own chunks are seen once)
        getattr(engine, "reset_prefix_cache", lambda: None)()
        t = time.perf_counter()
        rows = _generate(engine, records, sampling, seed)
        runs.append(
            {
                "seconds": round(time.perf_counter() - t, 4),
                "output_tokens": sum(r["output_tokens"] for r in rows),
                "records": len(rows),
                "errors": sum(1 for r in rows if r.get("error")),
                "empty": sum(1 for r in rows if not r.get("error") and r["output_tokens"] == 0),
            }
        )
    return {
        "setting": setting,
        "engine_start_s": round(start_s, 2),
        "runs": runs,
        "tok_s": [round(r["output_tokens"] / r["seconds"], 2) for r in runs],
    }


def _generate(engine: Any, records: list[dict], sampling: dict, seed: int | None) -> list[dict]:
    batch = [dict(r, chunk=0) for r in records]
    engine.add(batch, sampling, seed)
    rows: list[dict] = []
    while len(rows) < len(batch):
        rows += engine.step()
    return rows


def noise(base: dict) -> float:
    """The defaults' own spread between repeats, relative (2% at least)."""
    mean = sum(base["tok_s"]) / len(base["tok_s"])
    return max(0.02, (max(base["tok_s"]) - min(base["tok_s"])) / mean)


def valid(result: dict, base: dict) -> bool:
    """Every record back, no error the defaults did not have, tokens generated in each."""
    base_errors = max(r["errors"] for r in base["runs"])
    return all(
        x["records"] == base["runs"][0]["records"] and x["errors"] <= base_errors and not x["empty"]
        for x in result["runs"]
    )


def mean_tok_s(result: dict) -> float:
    return sum(result["tok_s"]) / len(result["tok_s"])


def leader(results: list[dict]) -> int | None:
    """The grid's fastest valid setting that beats the defaults by more than the noise."""
    base = results[0] if results and "tok_s" in results[0] else None
    if base is None:
        return None
    bar = mean_tok_s(base) * (1 + noise(base))
    best = None
    for k, r in enumerate(results[1:], 1):
        if "tok_s" in r and r["setting"] and valid(r, base) and mean_tok_s(r) > bar:
            if best is None or mean_tok_s(r) > mean_tok_s(results[best]):
                best = k
    return best


def _time_setting(
    tune_dir: Path, k: int, setting: dict, env: dict, timeout: float | None, clock=time.monotonic
) -> tuple[dict, float]:
    """Setting k timed in a process of its own: (its result, the seconds it cost by `clock`).
    A hard bound: a setting still running at `timeout` is stopped with its process group
    (the engine's own children too) and reported."""
    t0 = clock()
    p = subprocess.Popen(
        [sys.executable, "-m", "hpc_infer.worker.tuner", "one", str(tune_dir), str(k)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        stdout, stderr = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        return {"setting": setting, "skipped": f"stopped at the budget (tune.budget_s) after {timeout:.0f} s"}, (
            clock() - t0
        )
    if p.returncode == 0 and stdout.strip():
        return json.loads(stdout.strip().splitlines()[-1]), clock() - t0
    tail = [line for line in stderr.strip().splitlines() if line.strip()][-1:] or [f"exit {p.returncode}"]
    return {"setting": setting, "error": tail[0][-400:]}, clock() - t0


def run_tune(tune_dir: str | Path, clock=time.monotonic) -> dict:
    """Every setting of the grid in turn, each in its own process, then the confirmation of
    the grid's leader, all within the budget (but the first run of the defaults: nothing is
    compared without them). The budget is kept by `clock` (a test's own clock decides which
    settings fit, whatever the machine's load; a setting's stop is still in real seconds)."""
    tune_dir = Path(tune_dir)
    spec = json.loads((tune_dir / "tune_spec.json").read_text())
    deadline = clock() + float(spec["budget_s"])
    results, costs = [], {}
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")  # as a worker: the cluster's env, offline
    for key, value in (spec.get("env") or {}).items():
        env.setdefault(key, str(value))
    last_cost = 0.0
    for k, setting in enumerate(spec["grid"]):
        left = deadline - clock()
        if k and last_cost > left:
            results.append({"setting": setting, "skipped": "the budget (tune.budget_s) would be overrun"})
            continue
        result, last_cost = _time_setting(tune_dir, k, setting, env, max(left, 1.0) if k else None, clock)
        costs[k] = last_cost
        results.append(result)
    out: dict = {"results": results}
    k = leader(results)
    if k is not None:
        # the defaults again, then the leader again, back to back: kept only if it still wins
        if costs[0] + costs[k] > deadline - clock():
            out["confirm"] = {"index": k, "skipped": "the budget (tune.budget_s) leaves no time to confirm it"}
        else:
            again, _ = _time_setting(tune_dir, 0, spec["grid"][0], env, max(deadline - clock(), 1.0), clock)
            lead, _ = _time_setting(tune_dir, k, spec["grid"][k], env, max(deadline - clock(), 1.0), clock)
            out["confirm"] = {"index": k, "defaults": again, "setting": lead}
    out["finished"] = time.time()
    (tune_dir / "tune.json").write_text(json.dumps(out, indent=1) + "\n")
    return out


def main(argv: list[str]) -> int:
    if argv[:1] == ["one"]:
        print(json.dumps(one(Path(argv[1]), int(argv[2]))))
        return 0
    run_tune(argv[0])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
