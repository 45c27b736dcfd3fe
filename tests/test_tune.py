"""`hpc-infer tune`: settings timed on the run's own prompts; only one faster than the noise is
kept; launch applies what was kept and says so; the user's own engine_kwargs win."""

from __future__ import annotations

import json
from pathlib import Path
from statistics import mean

import pytest

from conftest import read_results, run_launch, sh
from hpc_infer.errors import UserError
from hpc_infer.tune import decide

FAKE = {"HPC_INFER_FAKE_ENGINE": json.dumps({"step_s": 0.001, "max_num_seqs": 8})}


def _result(setting, tok_s, records=8, errors=0, empty=0):
    runs = [{"seconds": 1.0, "output_tokens": t, "records": records, "errors": errors, "empty": empty} for t in tok_s]
    return {"setting": setting, "engine_start_s": 1.0, "runs": runs, "tok_s": tok_s}


GRID = [
    _result({}, [100.0, 110.0]),  # noise: 10 / 105 = 9.5%
    _result({"max_num_seqs": 64}, [112.0, 113.0]),  # +7%: within the noise
    _result({"max_num_seqs": 32}, [140.0, 150.0], empty=1),  # fast but an empty output: never
    _result({"enable_prefix_caching": False}, [90.0, 95.0]),
    {"setting": {"speculative_config": {"method": "ngram"}}, "error": "NotImplementedError: no spec on CPU"},
    _result({"max_num_batched_tokens": 4096}, [125.0, 124.0]),  # +18.6%: the grid's leader
]


def test_only_a_setting_faster_than_the_noise_and_confirmed_is_kept():
    confirm = {"index": 5, "defaults": _result({}, [80.0, 81.0]), "setting": _result(GRID[5]["setting"], [96.0, 97.0])}
    v = decide(GRID, confirm)  # the machine got slower for both alike: still +19.8% back to back
    assert v["kept"] == {"max_num_batched_tokens": 4096} and v["kept_ratio"] == pytest.approx(96.5 / 80.5, abs=1e-3)
    verdicts = [r["verdict"] for r in v["rows"]]
    assert verdicts[1] == "not faster than the noise" and verdicts[2].startswith("outputs not valid")
    assert verdicts[4].startswith("refused: NotImplementedError") and "confirmed back to back" in verdicts[5]
    assert decide([_result({}, [100.0, 100.0]), _result({"max_num_seqs": 64}, [101.0, 101.5])])["kept"] == {}
    with pytest.raises(UserError, match="the defaults did not run"):
        decide([{"setting": {}, "error": "boom"}])


@pytest.mark.parametrize(
    "confirm, why",
    [
        # the grid's +18.6% was the load changing: back to back the two are within the noise
        (
            {"index": 5, "defaults": _result({}, [120.0, 121.0]), "setting": _result({}, [124.0, 125.0])},
            "not in its confirmation (1.033x)",
        ),
        (
            {"index": 5, "skipped": "the budget (tune.budget_s) leaves no time to confirm it"},
            "not confirmed (the budget",
        ),
        (
            {"index": 5, "defaults": _result({}, [100.0, 100.0]), "setting": {"setting": {}, "error": "OOM"}},
            "its confirmation did not run (OOM)",
        ),
        (None, "not confirmed: not kept"),
    ],
)
def test_a_leader_the_confirmation_does_not_bear_out_is_not_kept(confirm, why):
    v = decide(GRID, confirm)
    assert v["kept"] == {} and v["kept_ratio"] == 1.0
    assert why in v["rows"][5]["verdict"] and v["rows"][5]["verdict"].endswith("not kept"), v["rows"][5]


def _write_spec(folder: Path, n: int, max_tokens: int, budget_s: float, env: dict, grid: list[dict]) -> None:
    """The tune_spec.json tune() would write: n fake prompts, 2 timed runs a setting."""
    spec = {
        "model": {"engine_kwargs": {}},
        "sampling": {"max_tokens": max_tokens},
        "seed": 0,
        "records": [{"id": f"r{i}", "index": i, "prompt": f"q{i}"} for i in range(n)],
        "repeats": 2,
        "budget_s": budget_s,
        "env": env,
        "grid": grid,
    }
    (folder / "tune_spec.json").write_text(json.dumps(spec))


def test_the_tuner_confirms_its_leader_back_to_back_with_the_defaults(tmp_path):
    """The fake engine's rate is max_num_seqs tokens a step: 1 at the defaults (as the
    env gives it), 8 with the grid's setting, so the setting leads by 8x whatever the load;
    the tuner then runs the defaults and the leader again, and decide keeps it."""
    from hpc_infer.worker.tuner import run_tune

    fake = {"HPC_INFER_FAKE_ENGINE": json.dumps({"step_s": 0.005, "max_num_seqs": 1})}
    _write_spec(tmp_path, 8, 16, 600, fake, [{}, {"max_num_seqs": 8}])
    out = run_tune(tmp_path)
    base, fast = out["results"]
    assert mean(fast["tok_s"]) > 3 * mean(base["tok_s"]), out  # 8x by construction; 3x under any load
    c = out["confirm"]
    assert c["index"] == 1 and c["defaults"]["setting"] == {} and c["setting"]["setting"] == {"max_num_seqs": 8}
    assert all(r["records"] == 8 for r in c["defaults"]["runs"] + c["setting"]["runs"])
    v = decide(out["results"], c)
    assert v["kept"] == {"max_num_seqs": 8} and v["kept_ratio"] > 3


def test_launch_applies_the_kept_settings_and_the_users_own_win(tmp_path):
    tuned = tmp_path / "runs" / "tuned" / "smollm2_cpu__local.yaml"
    tuned.parent.mkdir(parents=True)
    tuned.write_text("model:\n  engine_kwargs:\n    max_num_seqs: 64\n    enable_prefix_caching: false\n")
    p = run_launch(
        tmp_path, "cluster=local", "data.limit=3", "run_name=t", "+model.engine_kwargs.max_num_seqs=16", env=FAKE
    )
    assert f"engine settings from `hpc-infer tune` ({tuned})" in p.stderr, p.stderr
    spec = json.loads((tmp_path / "runs" / "t" / "worker.json").read_text())
    assert spec["model"]["engine_kwargs"]["max_num_seqs"] == 16  # the command line wins
    assert spec["model"]["engine_kwargs"]["enable_prefix_caching"] is False and spec["model"]["tuned_from"] == str(
        tuned
    )
    summary = json.loads((tmp_path / "runs" / "t" / "summary.json").read_text())
    assert summary["engine_settings"]["tuned_from"] == str(tuned)
    p = run_launch(tmp_path, "cluster=local", "data.limit=3", "run_name=u", "tune.use=false", env=FAKE)
    assert "hpc-infer tune" not in p.stderr
    assert (
        "enable_prefix_caching"
        not in json.loads((tmp_path / "runs" / "u" / "worker.json").read_text())["model"]["engine_kwargs"]
    )
    assert len(read_results(tmp_path / "runs" / "u" / "results.jsonl")) == 3


@pytest.mark.slow
def test_tune_times_real_settings_on_the_runs_prompts(tmp_path):
    """vLLM's CPU build, four prompts, a budget that fits the defaults and a few settings."""
    p = sh(
        tmp_path,
        f"hpc-infer tune cluster=local tune.sample=4 tune.budget_s=60 sampling.max_tokens=8 "
        f"output_root={tmp_path}/runs",
        timeout=1800,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "vLLM's defaults" in p.stdout and "the baseline (noise" in p.stdout, p.stdout
    tune = json.loads((tmp_path / "runs" / "tune__smollm2_cpu__local" / "tune.json").read_text())
    base = tune["results"][0]
    assert base["setting"] == {} and len(base["tok_s"]) == 2 and all(r["records"] == 4 for r in base["runs"])
    kept = Path(tmp_path / "runs" / "tuned" / "smollm2_cpu__local.yaml")
    assert kept.exists() and f"settings for launch: {kept}" in p.stderr


def test_a_setting_still_running_at_the_budget_is_stopped_with_its_processes(tmp_path):
    """tune.budget_s bounds every setting but the defaults: setting 1 is held forever (a
    failpoint before its engine is built), so only the tuner's stop at the budget can end it.
    The defaults run to the end, setting 1 is reported stopped and its process is gone, and
    the settings after it are skipped. The fake engine stands in for vLLM: this is the loop."""
    import itertools
    import os

    from hpc_infer.worker.tuner import run_tune

    hold = tmp_path / "hold"
    hold.mkdir()
    env = {
        "HPC_INFER_FAKE_ENGINE": json.dumps({"step_s": 0.001}),
        "HPC_INFER_FAULT": "tune_setting@setting-1:HOLD",
        "HPC_INFER_HOLD_DIR": str(hold),
    }
    # The budget is kept on a clock of the test's (one tick a look), so which settings fit never
    # depends on the machine's load: budget 6; the defaults cost 1 (looks 2-3), setting 1 starts
    # with 2 left (look 4) and is stopped after 2 real seconds, setting 2 has -1 left (look 7).
    ticks = itertools.count()
    _write_spec(tmp_path, 3, 4, 6, env, [{}, {"max_num_seqs": 32}, {"max_num_seqs": 64}])
    out = run_tune(tmp_path, clock=lambda: float(next(ticks)))
    base, held, after = out["results"]
    assert len(base["tok_s"]) == 2 and all(r["records"] == 3 for r in base["runs"]), base
    assert held["skipped"].startswith("stopped at the budget (tune.budget_s)"), held
    assert after["skipped"] == "the budget (tune.budget_s) would be overrun", after
    (marker,) = hold.glob("held.*")  # the held process was really there, and is gone now
    pid = int(marker.name.split(".")[1])
    assert not os.path.exists(f"/proc/{pid}") or b"zombie" in Path(f"/proc/{pid}/status").read_bytes().lower()
    assert not (hold / "release").exists()
    assert json.loads((tmp_path / "tune.json").read_text())["results"][1] == held
