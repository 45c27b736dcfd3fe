"""How far the launcher's ETA is from the real finish, by how spread the output lengths are.

The real launcher's progress estimate (run/progress.py) and the real workers run in the
protocol simulator (tests/simulation.py: fake engines, simulated clock and file server),
8 workers of 8 sequences on 256 records, polled as `launch` polls. At each poll once a
tenth of the records are done, the finish it predicts (the poll's time + the ETA) is
divided by the real finish. Two estimates of the same polls, side by side:

  rate   records left / the live workers' record rate (the ETA before worker/finish.py)
  shown  what `launch` shows: records not started / rate, then the longest running
         records' end as each worker estimates it (worker/finish.py)

Each row: polls, how many fall outside 1.5x (short: predicted too early; long: too late),
and the range of the ratio.

    .venv/bin/python bench/eta_accuracy.py [--draws 20]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

CASES = {  # name -> the fake engine's settings (lengths: log-normal, at most `max`)
    "uniform 9 tokens": {"step_s": 1.0, "max_num_seqs": 8, "tokens": 9},
    "sigma 0.5, max 4x median": {"step_s": 1.0, "max_num_seqs": 8, "lengths": {"median": 16, "sigma": 0.5, "max": 64}},
    "sigma 1, max 16x median": {"step_s": 1.0, "max_num_seqs": 8, "lengths": {"median": 8, "sigma": 1.0, "max": 128}},
    "sigma 1.5, max 64x median, step a+c*batch": {
        "step_s": 0.5,
        "step_per_seq_s": 0.1,
        "max_num_seqs": 8,
        "lengths": {"median": 8, "sigma": 1.5, "max": 512},
    },
}


def one_run(engine: dict, tmp: Path) -> list[tuple[float | None, float | None]]:
    import simulation as S
    from hpc_infer.run import progress

    seen: list = []
    real = progress.snapshot

    def snapshot(*a, **k):
        p = real(*a, **k)
        seen.append(p)
        return p

    progress.snapshot = snapshot
    try:
        lay = S.sized_layout(tmp, 8, 4, 8)
        sim = S.Sim(
            S.Schedule(0, "sized", 8, [], skew=[0.0]),
            lay,
            engine=engine,
            launcher_poll=True,
            heartbeat_s=10.0,
            check=False,
        )
        with contextlib.redirect_stderr(io.StringIO()):
            sim.run()
    finally:
        progress.snapshot = real
    out = sim.server.lookup([S.ROOT, "out"])
    end = max(json.loads(sim.server.nodes[i].data.splitlines()[-1])["finished"] for i in out.entries.values()) - S.EPOCH
    rows = []
    for (t, eta, done, n), p in zip(sim.shown, seen):
        if n / 10 <= done < n:
            left = n - done
            rate_eta = left / p.records_per_s if p.records_per_s > 0 else None
            rows.append(tuple(None if e is None else (t + e) / end for e in (rate_eta, eta)))
    return rows


def summary(ratios: list[float | None]) -> str:
    known = [r for r in ratios if r is not None]
    short = sum(1 for r in known if r < 1 / 1.5) + len(ratios) - len(known)
    long_ = sum(1 for r in known if r > 1.5)
    span = f"{min(known):.2f}-{max(known):.2f}" if known else "-"
    return f"{short + long_:>5} outside ({short} short, {long_} long), {span}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--draws", type=int, default=20, help="length draws per case (the fake engine's salt)")
    args = ap.parse_args()
    print(f"{'lengths':44} {'polls':>6}  {'rate: outside 1.5x, range':36}  shown: outside 1.5x, range")
    for name, engine in CASES.items():
        rate, shown = [], []
        for d in range(args.draws if "lengths" in engine else 1):
            conf = json.loads(json.dumps(engine))
            if "lengths" in conf:
                conf["lengths"]["salt"] = str(d)
            with tempfile.TemporaryDirectory() as tmp:
                for r, s in one_run(conf, Path(tmp)):
                    rate.append(r)
                    shown.append(s)
        print(f"{name:44} {len(shown):>6}  {summary(rate):36}  {summary(shown)}", flush=True)


if __name__ == "__main__":
    main()
