"""Plan + submit for a large prompt set vs. one plain read of the same file.

Generates N prompts (default 1,000,000), then measures side by side in one run:
  read   - read the file and json-parse every line (the least any tool must do)
  plan   - hpc_infer's one streaming pass: read, hash, check every record, cut token-balanced
           chunks and copy each chunk's bytes into the run directory (+ manifest, worker.json);
           once with all parsing in this process, once with blocks parsed by a few processes
           (the default for inputs over 16 MB), with how much the peak memory grew
  submit - the real `sbatch` through submitit for `--workers` array tasks, submitted
           held (--hold) and cancelled right after, so nothing runs
and counts sbatch calls. Needs the local Slurm (slurm/local-cluster.sh) for `submit`;
without it only read and plan are measured.

    .venv/bin/python bench/plan_submit.py [--records 1000000] [--workers 1000] [--shared-prefixes] [--repeat 3]

--shared-prefixes makes the prompts a shuffled documents x questions set (records/100
documents of 1,100 characters, 100 questions each, in random order), so prefix-aware
planning groups them: the plan then pays for grouping (each record's CRC-32 in the scan, the
keys sorted, order.bin written; no byte of the input is moved), and the ratio shows what
that costs: the same plan with
`data.group_prefixes=off` is timed beside it (always: on prompts without shared prefixes
it shows what looking for them costs).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--workers", type=int, default=1000)
    ap.add_argument("--shared-prefixes", action="store_true")
    ap.add_argument(
        "--repeat", type=int, default=0, help="then time read, plan and plan at off N more times, interleaved"
    )
    args = ap.parse_args()

    from hydra import compose, initialize_config_dir

    from hpc_infer.config import register_configs, to_run_config
    from hpc_infer.io.data import _scan_processes
    from hpc_infer.run.plan import plan_input, prepare
    from hpc_infer.rundir import read_json
    from hpc_infer.cluster.submit import SlurmBackend

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "prompts.jsonl"
        with open(data, "w") as f:
            if args.shared_prefixes:
                import random

                rng = random.Random(0)
                n_docs = max(1, args.records // 100)
                docs = [
                    f"Document {d}: " + " ".join(f"w{rng.randrange(10**6)}" for _ in range(140)) for d in range(n_docs)
                ]
                pairs = [(d, q) for d in range(n_docs) for q in range(args.records // n_docs)]
                rng.shuffle(pairs)
                for d, q in pairs:
                    prompt = f"{docs[d][:1100]}\nQuestion {q}: what does word {q} mean?"
                    f.write(json.dumps({"id": f"d{d}q{q}", "prompt": prompt}) + "\n")
            else:
                for i in range(args.records):
                    f.write(json.dumps({"id": f"q{i}", "prompt": "Solve: " + "x + " * (i % 50) + f"{i} = ?"}) + "\n")
        size_mb = data.stat().st_size / 1e6

        t = time.perf_counter()
        with open(data) as f:
            n = sum(1 for line in f if json.loads(line))
        t_read = time.perf_counter() - t

        register_configs()
        with initialize_config_dir(config_dir=str(ROOT / "hpc_infer/conf"), version_base=None):
            cfg = compose(
                "config",
                overrides=[
                    f"data.path={data}",
                    "cluster=slurm_local",
                    f"output_root={tmp}/runs",
                    f"cluster.workers={args.workers}",
                    "cluster.sbatch_extra=[--hold]",
                ],
            )
        rc = to_run_config(cfg)
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t = time.perf_counter()
        plan_input(rc, parallel=False).discard()
        t_plan_1 = time.perf_counter() - t
        t = time.perf_counter()
        planned = plan_input(rc)
        grouped = planned.grouped
        run, _ = prepare(rc, planned, "/models/unused", "")
        t_plan = time.perf_counter() - t
        # the same plan with data.group_prefixes=off: what prefix-aware planning adds
        t = time.perf_counter()
        plan_input(replace(rc, data=replace(rc.data, group_prefixes="off"))).discard()
        t_plan_off = time.perf_counter() - t

        # the plan-time context check (models/fit.py) with the real CPU model's tokenizer: only
        # chunks whose longest prompt could exceed max_model_len are read again; 1% of these
        # prompts are made long enough that they must be tokenized
        from hpc_infer.models.cpu_model import ensure_smollm2
        from hpc_infer.models.fit import find_too_long

        long_data = tmp / "some_long.jsonl"
        with open(long_data, "w") as f:
            for i in range(args.records // 10):
                f.write(json.dumps({"id": f"q{i}", "prompt": ("word " * 500 if i % 100 == 0 else f"Solve {i}")}) + "\n")
        with initialize_config_dir(config_dir=str(ROOT / "hpc_infer/conf"), version_base=None):
            rc_long = to_run_config(
                compose(
                    "config", overrides=[f"data.path={long_data}", f"output_root={tmp}/runs2", "data.too_long=mark"]
                )
            )
        model = str(ensure_smollm2())
        with plan_input(rc_long) as planned_long:
            t = time.perf_counter()
            with plan_input(rc_long):
                pass
            t_plan_long = time.perf_counter() - t
            t = time.perf_counter()
            found, _ = find_too_long(rc_long, planned_long, model, planned_long.spec)
            t_fit = time.perf_counter() - t
            t_fit_short = None
            if not args.shared_prefixes:  # the 1M short prompts: no chunk is a candidate
                t = time.perf_counter()
                find_too_long(rc, plan_input(rc), model, None)
                t_fit_short = time.perf_counter() - t
        rss_growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
        best = None  # after the memory figure: best of interleaved rounds (load moves single shots)
        if args.repeat:
            rc_off = replace(rc, data=replace(rc.data, group_prefixes="off"))
            times: dict[str, list[float]] = {"read": [], "auto": [], "off": []}
            for _ in range(args.repeat):
                t = time.perf_counter()
                with open(data) as f:
                    sum(1 for line in f if json.loads(line))
                times["read"].append(time.perf_counter() - t)
                for name, c in (("auto", rc), ("off", rc_off)):
                    t = time.perf_counter()
                    plan_input(c).discard()
                    times[name].append(time.perf_counter() - t)
            best = {k: min(v) for k, v in times.items()}
        n_chunks = read_json(run.manifest)["n_chunks"]

        t_submit = None
        if shutil.which("sbatch") and subprocess.run(["sinfo"], capture_output=True).returncode == 0:
            backend = SlurmBackend(rc.cluster, run, sys.executable)
            t = time.perf_counter()
            ids = backend.submit(args.workers)
            t_submit = time.perf_counter() - t
            backend.cancel(ids)
            sbatch_calls = len(list(run.logs.glob("*_submission.sh")))

    print(f"records={n:,} file={size_mb:.0f} MB chunks={n_chunks} workers={args.workers}")
    print(f"prefix-aware planning: {json.dumps(grouped) if grouped else 'input order (nothing to group)'}")
    print(f"read + json.loads every line: {t_read:6.2f} s")
    print(f"hpc_infer plan, 1 process   : {t_plan_1:6.2f} s   ratio plan/read = {t_plan_1 / t_read:.2f}")
    short = f"check {t_fit_short:.3f} s" if t_fit_short is not None else "check not run (long prompts)"
    print(
        f"context check, {args.records // 10:,} prompts, 1% long: plan {t_plan_long:.2f} s + check {t_fit:.2f} s "
        f"(ratio {(t_plan_long + t_fit) / t_plan_long:.2f}; {len(found)} found); {args.records:,} short prompts: "
        + short
    )
    print(
        f"hpc_infer plan              : {t_plan:6.2f} s   ratio plan/read = {t_plan / t_read:.2f}   "
        f"(blocks parsed in {_scan_processes(int(size_mb * 1e6))} processes; peak memory of this process grew {rss_growth:.0f} MB over both plans)"
    )
    print(
        f"the same plan, group_prefixes=off: {t_plan_off:6.2f} s   ratio = {t_plan_off / t_read:.2f}   "
        f"(prefix-aware planning adds {t_plan - t_plan_off:.2f} s = {(t_plan - t_plan_off) / t_read:.2f} reads)"
    )
    if t_submit is not None:
        print(f"submit {args.workers} tasks (real sbatch): {t_submit:6.2f} s   sbatch calls = {sbatch_calls}")
        print(f"plan + submit / read        : {(t_plan + t_submit) / t_read:.2f}")
    else:
        print("submit: skipped (no Slurm running; start slurm/local-cluster.sh)")
    if best:
        print(
            f"best of {args.repeat} interleaved rounds: read {best['read']:.2f} s, plan {best['auto']:.2f} s "
            f"({best['auto'] / best['read']:.2f} reads), group_prefixes=off {best['off']:.2f} s "
            f"({best['off'] / best['read']:.2f} reads): prefix-aware planning adds {best['auto'] - best['off']:.2f} s"
            + (
                f"; plan + submit / read = {(best['auto'] + t_submit) / best['read']:.2f}"
                if t_submit is not None
                else ""
            )
        )


if __name__ == "__main__":
    main()
