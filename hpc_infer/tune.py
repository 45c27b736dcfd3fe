"""`hpc-infer tune model=... cluster=... data=...`: time a small grid of engine settings on a
sample of the run's own prompts, on one task of the run's cluster, and keep the fastest.

The sample is the first `tune.sample` prompts of data.path, with the run's sampling. One
task (a Slurm job like a worker, a local process, or this process with cluster=debug)
runs worker/tuner.py: vLLM's defaults first, then max_num_seqs, max_num_batched_tokens,
prefix caching off and n-gram speculative decoding one at a time, until `tune.budget_s`
would be overrun; each setting's engine start and a warm-up excluded, its sample timed
`tune.repeats` times and its outputs checked. The grid's fastest setting that beats the
defaults by more than the defaults' own spread between repeats (the noise) is timed again
right after the defaults again; it is kept only when it still wins there by more than the
noise (a load that changed during the grid is not a gain): never one slower than the
defaults. The table is printed and kept in tune.json; the kept settings
go to <output_root>/tuned/<model>__<cluster>.yaml, which `launch` applies (and says so)
unless tune.use=false; a setting given in model.engine_kwargs wins over it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .cluster.container import worker_python
from .cluster.preflight import check_time_limit, cpu_build_on_gpus, preflight
from .cluster.submit import BACKENDS, TERMINAL, make_backend
from .config import RunConfig, to_run_config
from .errors import UserError
from .log import say
from .models.cache import resolve_model
from .run.plan import plan_input, worker_spec
from .rundir import RunDir, read_chunk_source, trust, write_atomic
from .secrets import exported, find_token, job_env
from .worker.tuner import candidates, leader, mean_tok_s, noise, valid


def sample_records(rc: RunConfig) -> list[dict]:
    """The first tune.sample records, as a worker rebuilds them."""
    rc = dataclasses.replace(rc, data=dataclasses.replace(rc.data, limit=rc.tune.sample, group_prefixes="off"))
    with plan_input(rc) as planned:
        spec = planned.spec.to_json()
        return [r for c in planned.chunks for r in read_chunk_source(RunDir(planned.staging).fs, c, spec).records]


def decide(results: list[dict], confirm: dict | None = None) -> dict:
    """The defaults' mean and noise, each setting's mean and verdict, and the one kept: the
    grid's leader, only when its confirmation (the defaults and it again, back to back) still
    shows it faster than the noise (the larger of the two runs of the defaults' spreads)."""
    base = results[0] if results and "tok_s" in results[0] else None
    if base is None:
        raise UserError(
            f"hpc-infer tune: the defaults did not run: {results[0].get('error') if results else 'nothing'}"
        )
    mean, spread = mean_tok_s(base), noise(base)
    lead = leader(results)
    kept, ratio, confirmed = {}, 1.0, None
    if lead is not None:
        c = confirm or {}
        again, mine = c.get("defaults") or {}, c.get("setting") or {}
        if c.get("index") != lead:
            confirmed = "faster than the noise in the grid, not confirmed: not kept"
        elif c.get("skipped"):
            confirmed = f"faster than the noise in the grid, not confirmed ({c['skipped']}): not kept"
        elif "tok_s" not in again or "tok_s" not in mine:
            why = mine.get("skipped") or mine.get("error") or again.get("skipped") or again.get("error")
            confirmed = f"faster than the noise in the grid, its confirmation did not run ({why}): not kept"
        else:
            r = mean_tok_s(mine) / mean_tok_s(again)
            if valid(mine, base) and r > 1 + max(spread, noise(again)):
                kept, ratio = results[lead]["setting"], round(r, 3)
                confirmed = f"faster than the noise, confirmed back to back with the defaults: {r:.3f}x"
            else:
                confirmed = f"faster than the noise in the grid, not in its confirmation ({r:.3f}x): not kept"
    rows = []
    for k, r in enumerate(results):
        row = {"setting": r["setting"] or "vLLM's defaults"}
        if "tok_s" not in r:
            row["verdict"] = r.get("skipped") or f"refused: {r.get('error')}"
        else:
            m = mean_tok_s(r)
            row.update(tok_s=round(m, 1), ratio=round(m / mean, 3), engine_start_s=r["engine_start_s"])
            if not r["setting"]:
                row["verdict"] = f"the baseline (noise {spread:.1%} between repeats)"
            elif not valid(r, base):
                row["verdict"] = "outputs not valid (records missing, errors or empty outputs): never kept"
            elif k == lead:
                row["verdict"] = confirmed
            elif m > mean * (1 + spread):
                row["verdict"] = "faster than the noise, not the fastest"
            else:
                row["verdict"] = "not faster than the noise"
        rows.append(row)
    return {
        "defaults_tok_s": round(mean, 1),
        "noise": round(spread, 4),
        "rows": rows,
        "kept": kept,
        "kept_ratio": ratio,
    }


def tune(rc: RunConfig) -> Path:
    c = rc.cluster
    if c.endpoint:
        raise UserError("hpc-infer tune times engine settings of vLLM in a worker; cluster.endpoint runs none")
    BACKENDS[c.backend].check_reachable(c)
    check_time_limit(c, rc.run_path)
    token = find_token(c.token_file)
    wrong_build = cpu_build_on_gpus(c)
    if wrong_build:
        raise UserError(wrong_build)
    model_path = resolve_model(rc.model, c, token)
    for note in preflight(rc.model, c, model_path):
        say(note)
    records = sample_records(rc)
    root = Path(rc.output_root).expanduser().resolve() / f"tune__{rc.model.name}__{c.name}"
    if root.is_symlink():
        raise UserError(f"{root}: a link in the tune folder's place; remove it (hpc_infer never writes through one)")
    shutil.rmtree(root, ignore_errors=True)
    RunDir(root).make()
    # the tune task's result decides the settings every launch applies: read it through the
    # folder's pinned handle, judged as the caller's own (rundir/trust.py), never by path
    run = RunDir(root, trust.open_dir(root, "the tune folder", trust.OWN))
    base = dataclasses.replace(rc, tune=dataclasses.replace(rc.tune, use=False))  # time vLLM's own defaults
    spec = worker_spec(base, model_path)
    tune_spec = {
        "model": spec["model"],
        "sampling": spec["sampling"],
        "seed": spec["seed"],
        "records": [{k: v for k, v in r.items() if k not in ("worker", "chunk")} for r in records],
        "repeats": rc.tune.repeats,
        "budget_s": rc.tune.budget_s,
        "env": spec["env"],
    }
    tune_spec["grid"] = candidates(tune_spec)
    run.fs.replace("tune_spec.json", (json.dumps(tune_spec, indent=1) + "\n").encode())
    say(
        f"timing {len(tune_spec['grid'])} engine settings on {len(records)} prompts of {rc.data.name} "
        f"({rc.tune.repeats} timed runs each, within {rc.tune.budget_s:g} s) on one {c.backend} task: {root}"
    )
    if c.backend == "debug":
        from .worker.tuner import run_tune

        run_tune(root)
    else:
        from .cluster.task import TuneTask

        backend = make_backend(c, run, worker_python(rc, run, model_path))
        with exported(job_env(token)):
            (job,) = backend.submit(1, task=TuneTask(), indices=[0])
        while run.fs.stat("tune.json") is None:
            if backend.states([job]).get(job) in TERMINAL:
                if run.fs.stat("tune.json") is not None:
                    break
                raise UserError(f"the tune task {job} ended without a result; see {run.logs}")
            time.sleep(2)
    timed = run.read_json("tune.json")
    results, confirm = timed["results"], timed.get("confirm")
    verdict = decide(results, confirm)
    run.fs.replace(
        "tune.json", (json.dumps({"results": results, "confirm": confirm, **verdict}, indent=1) + "\n").encode()
    )
    print(table(verdict))
    target = rc.tuned_path
    target.parent.mkdir(parents=True, exist_ok=True)
    overlay = {"model": {"engine_kwargs": verdict["kept"]}}
    note = (
        f"# written by `hpc-infer tune` ({time.strftime('%Y-%m-%d %H:%M')}) for model={rc.model.name} "
        f"cluster={c.name}: {verdict['kept_ratio']}x vLLM's defaults on {len(records)} prompts of {rc.data.name}"
        f" (tune.json: {root / 'tune.json'}).\n# launch applies it unless tune.use=false; model.engine_kwargs "
        f"given on the command line win.\n"
    )
    write_atomic(target, (note + OmegaConf.to_yaml(overlay)).encode())
    say(
        ("kept " + json.dumps(verdict["kept"]) + f": {verdict['kept_ratio']}x the defaults")
        if verdict["kept"]
        else "kept vLLM's defaults: no setting beat them by more than the noise, confirmed back to back"
    )
    say(f"settings for launch: {target}")
    return target


def table(v: dict) -> str:
    lines = [f"{'setting':58} {'tok/s':>8} {'ratio':>6}  verdict"]
    for r in v["rows"]:
        name = json.dumps(r["setting"]) if isinstance(r["setting"], dict) else r["setting"]
        lines.append(f"{name[:58]:58} {r.get('tok_s', ''):>8} {r.get('ratio', ''):>6}  {r['verdict']}")
    return "\n".join(lines)


def hydra_task(cfg: DictConfig) -> None:
    """The command's work on Hydra's composed config (cli.py runs it through entry.run_hydra)."""
    tune(to_run_config(cfg))
