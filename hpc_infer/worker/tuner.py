"""Inside `hpc-infer tune`'s job: time engine settings on a sample of the run's own prompts.

Each setting runs in a process of its own (`python -m hpc_infer.worker.tuner ONE DIR K`),
so one engine's memory, threads or a build's refusal never leak into the next: the
engine is built and warmed up (not timed), then the sample is generated `repeats` times,
each timed from the first request in to the last result out. A setting's outputs are
checked to be valid (every record back, no error the defaults did not have, tokens
generated). The driver (`run_tune`) tries the defaults first, then one change at a time,
until the budget would be overrun, and writes tune.json. Standard library + vLLM only.
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
    t0 = time.time()
    engine = make_engine({"model": model})  # a fresh process: its own engine, as a worker's
    start_s = time.time() - t0
    records, sampling, seed = spec["records"], spec["sampling"], spec.get("seed")
    _generate(engine, records[:1], sampling, seed)  # warm-up: not timed
    runs = []
    for _ in range(int(spec["repeats"])):
        t = time.time()
        rows = _generate(engine, records, sampling, seed)
        runs.append(
            {
                "seconds": round(time.time() - t, 4),
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


def run_tune(tune_dir: str | Path) -> dict:
    """Every setting of the grid in turn, each in its own process, within the budget."""
    tune_dir = Path(tune_dir)
    spec = json.loads((tune_dir / "tune_spec.json").read_text())
    deadline = time.time() + float(spec["budget_s"])
    results, last_cost = [], 0.0
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")  # as a worker: the cluster's env, offline
    for key, value in (spec.get("env") or {}).items():
        env.setdefault(key, str(value))
    for k, setting in enumerate(spec["grid"]):
        left = deadline - time.time()
        if k and last_cost > left:
            results.append({"setting": setting, "skipped": "the budget (tune.budget_s) would be overrun"})
            continue
        t0 = time.time()
        # a hard bound: a setting still running when the budget ends is stopped (its process
        # group: the engine's own children too) and reported, so a tune outlasts its budget only
        # by the defaults' own run (always run to the end: nothing is compared without them)
        p = subprocess.Popen(
            [sys.executable, "-m", "hpc_infer.worker.tuner", "one", str(tune_dir), str(k)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )
        try:
            stdout, stderr = p.communicate(timeout=max(left, 1.0) if k else None)  # the defaults: the baseline
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            results.append({"setting": setting, "skipped": f"stopped at the budget (tune.budget_s) after {left:.0f} s"})
            last_cost = time.time() - t0
            continue
        last_cost = time.time() - t0
        if p.returncode == 0 and stdout.strip():
            results.append(json.loads(stdout.strip().splitlines()[-1]))
        else:
            tail = [line for line in stderr.strip().splitlines() if line.strip()][-1:] or [f"exit {p.returncode}"]
            results.append({"setting": setting, "error": tail[0][-400:]})
    out = {"results": results, "finished": time.time()}
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
