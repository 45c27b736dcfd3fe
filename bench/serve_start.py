"""`hpc-infer serve`: submit -> ready, split into its parts, cold and again warm.

Runs `hpc-infer serve` twice on the same model (the second finds the weights in the page
cache) and prints, side by side:
  queue   - `hpc-infer serve` typed to the replica's job starting: the command's own start (imports,
            model resolution, pre-flight) plus the scheduler's queue
  import  - job start to vLLM's banner (Python, torch and vLLM imported)
  load    - banner to "Starting vLLM server" (weights loaded, engine built, warmed up)
  ready   - server listening to /health answering (what the replica waits for)
Timestamps come from the replica's state file and the server's own log (1 s resolution).
    .venv/bin/python bench/serve_start.py [--cluster slurm_local]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def _log_time(line: str) -> float | None:
    m = re.search(r"INFO (\d\d)-(\d\d) (\d\d):(\d\d):(\d\d)", line)
    if not m:
        return None
    mo, d, h, mi, s = map(int, m.groups())
    return time.mktime((time.localtime().tm_year, mo, d, h, mi, s, 0, 0, -1))


def one(tmp: Path, cluster: str, name: str) -> dict:
    env = dict(
        os.environ,
        PATH=f"{BIN}:{os.environ['PATH']}",
        HOME=str(tmp / "home"),
        HPC_INFER_CACHE=os.environ.get("HPC_INFER_CACHE", str(Path.home() / ".cache" / "hpc_infer")),
    )
    t_submit = time.time()
    p = subprocess.run(
        ["hpc-infer", "serve", f"cluster={cluster}", f"run_name={name}", f"output_root={tmp}/runs"],
        env=env,
        capture_output=True,
        text=True,
    )
    t_done = time.time()
    root = tmp / "runs" / name
    if p.returncode != 0:
        sys.exit(f"serve failed: {p.stderr[-3000:]}")
    state = json.loads((root / "serve" / "0.json").read_text())
    banner = listening = None
    for line in (root / "serve" / "0.log").read_text(errors="replace").splitlines():
        if banner is None and "version" in line and "INFO" in line:
            banner = _log_time(line)
        if listening is None and "Starting vLLM server" in line:
            listening = _log_time(line)
    subprocess.run(["hpc-infer", "serve", "stop", str(root)], env=env, capture_output=True)
    return {
        "queue": state["started"] - t_submit,
        "import": banner - state["started"],
        "load": listening - banner,
        "ready": state["ready_at"] - listening,
        "total": state["ready_at"] - t_submit,
        "command": t_done - t_submit,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cluster", default="slurm_local")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "home").mkdir()
        cold = one(tmp, args.cluster, "cold")
        warm = one(tmp, args.cluster, "warm")
    print(f"{'part':8} {'first':>8} {'second':>8}   (seconds; second start has the weights in the page cache)")
    for k in ("queue", "import", "load", "ready", "total"):
        print(f"{k:8} {cold[k]:8.1f} {warm[k]:8.1f}")
    print(
        f"second/first total = {warm['total'] / cold['total']:.2f}; the `hpc-infer serve` command returned after "
        f"{cold['command']:.1f} s and {warm['command']:.1f} s"
    )


if __name__ == "__main__":
    main()
