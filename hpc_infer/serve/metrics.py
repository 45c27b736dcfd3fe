"""`hpc-infer serve metrics RUN [--json] [--once] [--watch] [--interval S]`: live load per replica.

Per replica and in total: running and waiting requests, prompt and generation tokens/s
(the change in vLLM's counters between two samples `--interval` seconds apart), KV-cache
use and the time left in its allocation (squeue's, or on the local backend the cluster's
time limit counted from the replica's start). Refreshes in place on a terminal until
Ctrl-C; elsewhere (a pipe, `--once`, `--json`) one sample, or with `--watch` one per
interval (JSON lines with `--json`).
"""

from __future__ import annotations

import json
import sys
import time

from ..config import time_to_minutes
from .serverun import ServeRun

COUNTERS = ("prompt_tokens", "generation_tokens")


def _left(r: dict, limit_min: float | None, now: float) -> str | None:
    if r.get("time_left"):
        return r["time_left"]
    if limit_min and r.get("started") and r["state"] in ("ready", "loading", "restarting"):
        s = max(0, int(r["started"] + limit_min * 60 - now))
        return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
    return None


def sample(run: ServeRun, interval_s: float) -> dict:
    """Two reads of every ready replica's /metrics, `interval_s` apart: levels from the second,
    rates from the difference."""
    from .status import replica_states

    spec = run.spec
    limit = spec.get("cluster_config", {}).get("time")
    limit_min = time_to_minutes(limit) if limit else None
    first = {r["replica"]: r.get("metrics") for r in replica_states(run, with_metrics=True)}
    t0 = time.monotonic()
    time.sleep(interval_s)
    states = replica_states(run, with_metrics=True)
    dt, now = max(time.monotonic() - t0, 1e-6), time.time()
    rows = []
    for r in states:
        m, before = r.get("metrics"), first.get(r["replica"])
        row = {
            "replica": r["replica"],
            "state": r["state"],
            "url": r["url"],
            "job": r["job"],
            "time_left": _left(r, limit_min, now),
            "running": None,
            "waiting": None,
            "prompt_tokens_per_s": None,
            "generation_tokens_per_s": None,
            "kv_cache_usage": None,
        }
        if m:
            row.update(
                running=int(m["running"]),
                waiting=int(m["waiting"]),
                kv_cache_usage=m["kv_cache_usage"],
                requests=int(m["requests"]),
            )
            for c in COUNTERS:  # a server restarted in between starts its counters at 0 again
                row[f"{c}_per_s"] = max(0.0, m[c] - before[c]) / dt if before else None
        rows.append(row)
    up = [r for r in rows if r["running"] is not None]
    total = {
        "replicas_ready": len(up),
        "replicas": len(rows),
        "running": sum(r["running"] for r in up),
        "waiting": sum(r["waiting"] for r in up),
        "prompt_tokens_per_s": sum(r["prompt_tokens_per_s"] or 0.0 for r in up),
        "generation_tokens_per_s": sum(r["generation_tokens_per_s"] or 0.0 for r in up),
        "kv_cache_usage": (sum(r["kv_cache_usage"] for r in up) / len(up)) if up else None,
    }
    return {
        "run": str(run.root),
        "model": spec["served_name"],
        "t": now,
        "interval_s": round(dt, 3),
        "replicas": rows,
        "total": total,
    }


def table(s: dict) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    head = (
        f"{'replica':>7}  {'state':9} {'running':>7} {'waiting':>7} {'prompt tok/s':>12} {'gen tok/s':>10} "
        f"{'KV cache':>8}  {'time left':>10}"
    )
    lines = [f"{s['model']}  ({s['run']}; rates over {s['interval_s']:.1f} s)", head]
    for r in s["replicas"]:
        kv = f"{100 * r['kv_cache_usage']:.1f}%" if r["kv_cache_usage"] is not None else "-"
        lines.append(
            f"{r['replica']:>7}  {r['state']:9} {f(r['running'], 'd'):>7} {f(r['waiting'], 'd'):>7} "
            f"{f(r['prompt_tokens_per_s'], '.1f'):>12} {f(r['generation_tokens_per_s'], '.1f'):>10} "
            f"{kv:>8}  {r['time_left'] or '-':>10}"
        )
    t = s["total"]
    kv = f"{100 * t['kv_cache_usage']:.1f}%" if t["kv_cache_usage"] is not None else "-"
    lines.append(
        f"{'total':>7}  {str(t['replicas_ready']) + '/' + str(t['replicas']) + ' up':9} {t['running']:>7} "
        f"{t['waiting']:>7} {t['prompt_tokens_per_s']:>12.1f} {t['generation_tokens_per_s']:>10.1f} {kv:>8}"
    )
    return "\n".join(lines)


def watch(run: str, interval_s: float = 2.0, once: bool = False, as_json: bool = False, repeat: bool = False) -> int:
    """On a terminal (no --json/--once): the table, redrawn every sample until Ctrl-C.
    Otherwise one sample, or with `repeat` (--watch) one per interval (JSON lines with --json)."""
    srun = ServeRun.open(run, "hpc-infer serve metrics")
    live = sys.stdout.isatty() and not once and not as_json
    try:
        while True:
            s = sample(srun, interval_s)
            if as_json:
                print(json.dumps(s), flush=True)
            elif live:
                sys.stdout.write("\x1b[H\x1b[2J" + table(s) + "\n(Ctrl-C to stop)\n")
                sys.stdout.flush()
            else:
                print(table(s), flush=True)
            if not (live or repeat) or once:
                return 0
    except KeyboardInterrupt:
        return 0
