"""What `hpc-infer tune` buys, measured side by side: tune on the run's own prompts, then
the same launch with the kept settings (tune.use=true) and with vLLM's defaults
(tune.use=false), alternated, fresh processes each (local backend, CPU default model).
By default on the default data (the bundled chat prompts, the default sampling: what
`hpc-infer launch` runs); `--synthetic N` uses N generated summarization prompts instead.

    .venv/bin/python bench/tune_gain.py [--synthetic 96 --max-tokens 48] [--reps 2 --budget 600]

Prints the tune table's verdict, each launch's wall time (summary.json: the launch's own
span, engine start included) and the ratio default / tuned (> 1: tuned is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".venv" / "bin"
WORDS = "river stone market lantern orchard signal harbor meadow copper winter garden silver tower".split()


def prompts(path: Path, n: int) -> Path:
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(n):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 200)))
            f.write(json.dumps({"id": f"p{i}", "prompt": f"Summarize: {text}\nSummary:"}) + "\n")
    return path


def hpc_infer(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}")
    p = subprocess.run(["hpc-infer", *args], capture_output=True, text=True, env=env, cwd=tmp)
    if p.returncode:
        raise SystemExit(f"hpc-infer {' '.join(args)} failed:\n{p.stderr[-3000:]}")
    return p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--synthetic", type=int, default=0, help="N generated prompts instead of the default data")
    ap.add_argument("--max-tokens", type=int, default=48, help="with --synthetic")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--budget", type=float, default=600)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-tune-"))
    common = ["cluster=local", f"output_root={tmp}/runs"]
    what = "the default data and sampling"
    if args.synthetic:
        data = prompts(tmp / "prompts.jsonl", args.synthetic)
        common += [f"data.path={data}", "sampling=greedy", f"sampling.max_tokens={args.max_tokens}"]
        what = f"{args.synthetic} synthetic prompts x {args.max_tokens} tokens"
    t0 = time.time()
    p = hpc_infer(tmp, "tune", *common, f"tune.sample={args.synthetic or 48}", f"tune.budget_s={args.budget}")
    print(p.stdout.strip() or p.stderr.strip().splitlines()[-1])
    print(f"tune took {time.time() - t0:.0f} s")
    tuned_files = sorted((tmp / "runs" / "tuned").glob("*.yaml"))
    print("kept:", tuned_files[0].read_text().strip() if tuned_files else "nothing (the defaults were not beaten)")
    walls: dict[str, list[float]] = {"default": [], "tuned": []}
    for rep in range(args.reps):
        for name, use in (("default", "false"), ("tuned", "true")):
            run = f"{name}-{rep}"
            hpc_infer(tmp, "launch", *common, f"tune.use={use}", f"run_name={run}")
            s = json.loads((tmp / "runs" / run / "summary.json").read_text())
            walls[name].append(s["wall_s"])
            print(
                json.dumps(
                    {
                        "run": run,
                        "wall_s": s["wall_s"],
                        "engine_settings": s.get("engine_settings"),
                        "output_tokens": s["output_tokens"],
                    }
                )
            )
    d, t = statistics.median(walls["default"]), statistics.median(walls["tuned"])
    print(
        f"\n{what}, launch wall (median of {args.reps}): "
        f"vLLM's defaults {d:.1f} s, tuned {t:.1f} s: default/tuned = {d / t:.2f}x"
    )


if __name__ == "__main__":
    main()
