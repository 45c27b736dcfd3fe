"""Prefix-aware planning, measured side by side through `hpc-infer launch` (2 local workers,
vLLM's CPU build, SmolLM2-135M in float32, 1 GiB of KV cache each, prefix caching on).

Sets:
- documents x questions, shuffled: D documents of ~1,400 tokens, Q questions about each, in
  random order; their prefixes do not all fit a worker's KV cache. Planned in input order
  (data.group_prefixes=off), prefix-aware (auto), and the same set given already grouped;
- a few-shot set: one ~1,200-token preamble before every question (it fits the cache);
- no shared prefix: distinct prompts of the same length.

    .venv/bin/python bench/prefix_planning.py [--docs 32 --questions 6]

Prints each launch's wall time and tokens/s and the ratios the README reports.
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
WORDS = (
    "river stone market lantern orchard signal harbor meadow copper winter garden silver tower "
    "bridge forest candle mirror valley thunder"
).split()


def document(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def write(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    return path


def sets(tmp: Path, docs: int, questions: int) -> dict[str, Path]:
    rng = random.Random(0)
    texts = [document(rng, 1100) for _ in range(docs)]  # ~1,400 tokens of SmolLM2's tokenizer
    qa = [
        f"Document {d}:\n{texts[d]}\n\nQuestion {q}: which word comes {q + 1}th?"
        for d in range(docs)
        for q in range(questions)
    ]
    shuffled = qa[:]
    random.Random(1).shuffle(shuffled)
    preamble = document(rng, 950)
    few = [f"Examples:\n{preamble}\n\nQuestion {i}: how many words?" for i in range(len(qa))]
    distinct = [f"Note {i}: {document(rng, 1100)}\n\nQuestion: which word is first?" for i in range(len(qa))]
    return {
        "grouped": write(tmp / "grouped.jsonl", qa),
        "shuffled": write(tmp / "shuffled.jsonl", shuffled),
        "few_shot": write(tmp / "few.jsonl", few),
        "distinct": write(tmp / "distinct.jsonl", distinct),
    }


def launch(tmp: Path, name: str, data: Path, grouping: str, rep: int) -> dict:
    run = f"{name}-{grouping}-{rep}"
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}")
    t0 = time.time()
    p = subprocess.run(
        [
            "hpc-infer",
            "launch",
            "cluster=local",
            "cluster.workers=2",
            f"data.path={data}",
            "sampling=greedy",
            "sampling.max_tokens=8",
            "model.dtype=float32",
            "chunks_per_worker=8",
            f"data.group_prefixes={grouping}",
            f"run_name={run}",
            f"output_root={tmp}/runs",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp,
    )
    wall = time.time() - t0
    if p.returncode:
        raise SystemExit(f"{run} failed:\n{p.stderr[-3000:]}")
    s = json.loads((tmp / "runs" / run / "summary.json").read_text())
    return {
        "run": run,
        "launch_s": round(wall, 1),
        "wall_s": s["wall_s"],
        "prompt_tokens": s["prompt_tokens"],
        "grouped": bool(s.get("planning")),
        "prefix_cache_hit_rate": (s.get("prefix_cache") or {}).get("hit_rate"),
    }


VARIANTS = {  # name -> (set, data.group_prefixes)
    "shuffled-off": ("shuffled", "off"),
    "shuffled-auto": ("shuffled", "auto"),
    "grouped-off": ("grouped", "off"),
    "few_shot-off": ("few_shot", "off"),
    "few_shot-auto": ("few_shot", "auto"),
    "distinct-off": ("distinct", "off"),
    "distinct-auto": ("distinct", "auto"),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=32)
    ap.add_argument("--questions", type=int, default=6)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="which launches, in this order")
    ap.add_argument(
        "--reps",
        type=int,
        default=1,
        help="rounds over the variants (order reversed every other round); medians reported",
    )
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-prefix-"))
    data = sets(tmp, args.docs, args.questions)
    names = args.variants.split(",")
    walls: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(args.reps):
        for n in names if rep % 2 == 0 else names[::-1]:  # ABBA: neither variant always runs first
            which, grouping = VARIANTS[n]
            row = launch(tmp, which, data[which], grouping, rep)
            print(json.dumps(row), flush=True)
            walls[n].append(row["wall_s"])
    w = {n: statistics.median(v) for n, v in walls.items()}
    print(f"\nmedian launch wall time over {args.reps} round(s): " + ", ".join(f"{n} {v:.1f} s" for n, v in w.items()))
    if {"shuffled-off", "shuffled-auto"} <= set(w):
        print(
            f"documents x questions ({args.docs} x {args.questions}, shuffled): input order / prefix-aware = "
            f"{w['shuffled-off'] / w['shuffled-auto']:.2f}x"
            + (
                f"; given grouped / prefix-aware = {w['grouped-off'] / w['shuffled-auto']:.2f}"
                if "grouped-off" in w
                else ""
            )
        )
    for which in ("few_shot", "distinct"):
        if {f"{which}-off", f"{which}-auto"} <= set(w):
            off, auto = walls[f"{which}-off"], walls[f"{which}-auto"]
            paired = [o / a for o, a in zip(off, auto)]  # each round's two launches ran back to back
            print(
                f"{which}: off / auto = {w[f'{which}-off'] / w[f'{which}-auto']:.2f}x (medians); per round "
                + ", ".join(f"{r:.2f}" for r in paired)
                + f", geometric mean {statistics.geometric_mean(paired):.2f}x"
            )


if __name__ == "__main__":
    main()
