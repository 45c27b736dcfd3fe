"""`python -m hpc_infer.launch model=... cluster=... data=... sampling=...`

Config -> records -> model path -> plan (or resume) -> submit -> wait -> merge.
Everything that can be wrong with the input is found before anything is submitted.
"""

from __future__ import annotations


from omegaconf import DictConfig, OmegaConf

import time
from contextlib import contextmanager
from typing import Iterator

from .rundir import claims, isolate, jobs, notices
from .models.cache import resolve_model
from .models.fit import check_fit
from .config import RunConfig, to_run_config
from .cluster.container import worker_python
from .entry import run_hydra
from .log import plural, say
from .serve.batch_endpoint import resolve_endpoint
from .errors import UserError
from .run.merge import Summary, merge, report_errors
from .run.plan import TUNABLE, plan_input, prepare
from .cluster.preflight import check_time_limit, cpu_build_on_gpus, preflight
from .rundir import RunDir, set_permissions
from .secrets import exported, find_token, job_env
from .run.progress import failures, wait
from .cluster.submit import BACKENDS, TERMINAL, make_backend, recorded_jobs
from .models.vllm_check import check_run_sampling


def unreachable_for_group(root, group: str | None) -> str | None:
    """With permissions=group, a folder above the run that the group cannot enter (an
    output_root created private, a 0700 home) makes the run unreachable for it: say which."""
    import grp
    import os
    import stat
    from pathlib import Path

    try:
        gid = grp.getgrnam(group).gr_gid if group else None
    except KeyError:
        gid = None
    for d in Path(root).resolve().parents:
        st = os.stat(d)
        if st.st_mode & stat.S_IXOTH or (gid is not None and st.st_gid == gid and st.st_mode & stat.S_IXGRP):
            continue
        return (
            f"permissions=group: {d} (mode {stat.filemode(st.st_mode)}) does not let group {group} in, so the "
            f"group cannot reach {root}; run `chmod o+x {d}` or `chgrp {group} {d} && chmod g+x {d}`"
        )
    return None


def sampling_line(rc: RunConfig, planned) -> str:
    """Which sampling the records get, said before anything runs."""
    if planned.input_format == "openai_batch" and rc.data.batch_defaults == "server":
        return "sampling per batch line (a field a body leaves out: vLLM's server default)"
    s = rc.sampling
    card = [k for k, v in rc.model.sampling_defaults.items() if getattr(s, k, None) == v]
    return (
        f"sampling={s.name} (temperature {s.temperature:g}, top_p {s.top_p:g}, max_tokens {s.max_tokens}"
        + (f", stop {list(s.stop)}" if s.stop else "")
        + ")"
        + (f"; {', '.join(card)} from model {rc.model.name}'s card (model.sampling_defaults)" if card else "")
    )


def set_aside_damaged(run: RunDir) -> list[int]:
    """Outputs that exist but are not complete (cut, edited: never written so by a worker,
    whose outputs appear whole by link()) are moved aside through the run's handle (only
    the file judged damaged: rundir/chunks.set_aside), said, and their chunks redone:
    workers take an output's name as done without reading it."""
    from .rundir.chunks import grave_of, set_aside

    damaged, stuck = sorted(run.output_files() - run.done_chunks()), []
    for cid in damaged:
        name = run.out_name(cid)
        st = run.fs.stat(name)
        if st is not None and not set_aside(run.fs, name, st):
            grave = grave_of(name, st)
            now, there = run.fs.stat(name), run.fs.stat(grave)
            if now is not None and now.ino == st.ino and there is not None and there.ino == st.ino:
                stuck.append((cid, grave))  # an earlier set-aside stopped halfway
    left = {c for c, _ in stuck}
    moved = [c for c in damaged if c not in left]
    if moved:
        say(
            f"chunk output{'s' * (len(moved) != 1)} {moved[:10]} {'were' if len(moved) != 1 else 'was'} "
            f"damaged (no valid trailer): moved aside in {run.out}, redone"
        )
    for cid, grave in stuck:
        say(
            f"chunk output {run.out}/{run.out_name(cid).rpartition('/')[2]} is damaged (no valid trailer) and "
            f"was not moved aside: an earlier set-aside of it stopped halfway (a worker killed in it, or a "
            f"file-server link reply lost), and it is also at {run.root}/{grave}. Once no worker of this "
            f"run is running, remove that output file (the copy stays under the other name) and launch again"
        )
    return damaged


def run_env(run: RunDir, token) -> dict[str, str]:
    """What the jobs inherit: the token (never written anywhere) and the run's identity, which
    each worker checks before it reads anything (rundir/trust.py: check_pin)."""
    from .rundir.fsio import PIN_ENV

    return {**job_env(token), PIN_ENV: run.fs.pin().encode()}


@contextmanager
def swapped_while_submitting(run: RunDir) -> Iterator[None]:
    """submitit and the scheduler take the run's logs folder by path. Whoever can write a
    folder above the run can swap the run away under that path mid-submission (a neighbour's
    RENAME_EXCHANGE loop: tests/test_doors.py), and the submission then fails on a missing
    file. Said as what it is, by the run's identity, instead of a traceback; any job already
    submitted checks that identity before it reads anything (check_pin) and stops."""
    from .rundir import trust

    try:
        yield
    except OSError as e:
        above = trust.exchangeable_parent(getattr(run.fs, "ancestors", []))
        try:  # swapped now? (a swap can also have been undone by the time we look: `above` says it could)
            there = trust.open_dir(run.root, "launch")
            try:
                trust.check_pin(there, run.fs.pin(), "launch")
            finally:
                there.close()
            swapped = False
        except (UserError, OSError):
            swapped = True
        if not (swapped or above):
            raise
        raise UserError(
            f"launch: the submission failed on a file of {run.root} ({e.__class__.__name__}: {e.strerror or e}), "
            + (
                "which is not the run directory planned any more: it was moved or replaced"
                if swapped
                else f"whose path can be swapped for another folder by whoever can write {above}"
            )
            + ". Any job already submitted checks the run's identity before it reads anything and stops. Put "
            "runs under a folder only you can write (output_root=...) and launch again"
        ) from None


def _submit(rc: RunConfig, run: RunDir, backend, token, model_path: str) -> list[str]:
    """Workers for what is left: claims of dead workers released, live ones waited for."""
    set_aside_damaged(run)
    notices.clear_notices(run)  # an earlier launch's `done` must not end these workers
    remaining = run.read_json("manifest.json")["n_chunks"] - len(run.done_chunks())
    old_backend, old_ids = recorded_jobs(run)
    dead: set[str] = set()
    if old_ids and old_backend == rc.cluster.backend:
        states = backend.states(old_ids)
        dead = {j for j, s in states.items() if s in TERMINAL or s == "UNKNOWN"}
    dropped = claims.release_dead(run, rc.cluster.lease_s, dead)
    if dropped:
        say(f"released {len(dropped)} claims left by workers that are gone: chunks {dropped[:10]}")
    held = claims.live_claims(run, rc.cluster.lease_s)
    if held:
        say(
            f"{plural(len(held), 'chunk')} {'is' if len(held) == 1 else 'are'} being worked on by live workers of "
            f"an earlier launch; waiting for them as well"
        )
    n_workers = min(rc.cluster.workers, remaining - len(held))
    job_ids = []
    if n_workers > 0 and rc.cluster.nodes_per_task > 1:  # the rendered script: Ray per allocation
        from .run.sbatch import write_rendered

        script = write_rendered(rc, run, model_path, n_workers)
        with exported(run_env(run, token)), swapped_while_submitting(run):
            job_ids = backend.submit_script(script, n_workers)
    elif n_workers > 0:
        with exported(run_env(run, token)), swapped_while_submitting(run):
            job_ids = backend.submit(n_workers)
    if job_ids:
        say(
            f"submitted {plural(len(job_ids), rc.cluster.backend + ' worker')}: {job_ids[0]}"
            f"{' ...' if len(job_ids) > 1 else ''}"
        )
    return job_ids


def launch(rc: RunConfig, config_yaml: str) -> Summary | None:
    if rc.cluster.nodes_per_task > 1 and rc.cluster.backend != "slurm":
        raise UserError(
            f"cluster.nodes_per_task={rc.cluster.nodes_per_task}: a model across nodes needs Slurm "
            f"allocations (Ray inside each); cluster={rc.cluster.name} has backend "
            f"{rc.cluster.backend}. Use a Slurm cluster config, or nodes_per_task=1"
        )
    BACKENDS[rc.cluster.backend].check_reachable(rc.cluster)
    check_time_limit(rc.cluster, rc.run_path)
    set_permissions(rc.permissions)
    with plan_input(rc) as planned:  # one pass over the input; a private staging dir, gone on any error
        checked = check_run_sampling(rc, planned.overrides, planned.input_format)
        if checked:
            say(checked)
        token = find_token(rc.cluster.token_file)
        endpoint = resolve_endpoint(rc) if rc.cluster.endpoint else None
        if endpoint:
            model_path = endpoint["model_path"]
            where = (
                f"the router at {endpoint['urls'][0]}"
                if endpoint.get("router")
                else f"{len(endpoint['urls'])} running server(s)"
            )
            say(f"batch through {where} of {endpoint['model']}: no model load per worker")
        else:
            wrong_build = cpu_build_on_gpus(rc.cluster)
            if wrong_build:
                raise UserError(wrong_build)
            model_path = resolve_model(rc.model, rc.cluster, token)
            for note in preflight(rc.model, rc.cluster, model_path):
                say(note)
        too_long = check_fit(rc, planned, model_path, say)
        run, resumed = prepare(rc, planned, model_path, config_yaml, endpoint, too_long)
    if rc.permissions == "group":
        blocked = unreachable_for_group(run.root, rc.run_group)
        if blocked:
            say(blocked)
    manifest = run.read_json("manifest.json")
    remaining = manifest["n_chunks"] - len(run.done_chunks())
    if resumed and not remaining:
        say(
            f"{run.root} is already complete: all {manifest['n_records']} records were done by an earlier launch, "
            f"so nothing is submitted (a changed cluster= does not start a new run). To run again, give a new "
            f"run_name=..., or delete {run.root}. Merging what is there:"
        )
    else:
        say(
            f"{'resuming' if resumed else 'planned'} {run.root}: {manifest['n_records']} records in "
            f"{manifest['n_chunks']} chunks, {remaining} to do; model {model_path}; {sampling_line(rc, planned)}"
            + (f"; HF token from {token.source}" if token else "")
        )
    spec_model = run.read_json("worker.json")["model"]
    tuned = spec_model.get("tuned_from")
    if tuned:  # what the workers run, from the run's own worker.json: the store is never read again by path
        kept = {k: v for k, v in spec_model["engine_kwargs"].items() if k in TUNABLE}
        say(
            f"engine settings from `hpc-infer tune` ({tuned}): "
            + (", ".join(f"{k}={v}" for k, v in sorted(kept.items())) or "vLLM's defaults")
            + " (tune.use=false: none)"
        )
    g = manifest.get("grouped")
    if g:
        say(
            f"prefix-aware plan: {g['records_in_shared_groups']} records in {g['groups']} groups sharing their first "
            f"{g['prefix_chars']:,} characters planned into the same chunks (they were in {g['runs_before']} pieces); "
            f"results keep the input's order (data.group_prefixes=off plans in input order)"
        )
    if remaining:
        backend = make_backend(rc.cluster, run, worker_python(rc, run, model_path))
        resubmits = 0
        started = time.time()
        while True:
            before = isolate.run_marker(run)
            job_ids = _submit(rc, run, backend, token, model_path)
            if not rc.wait:
                say(f"not waiting; follow with `hpc-infer status {run.root}`, then `hpc-infer merge {run.root}`")
                return None
            progress = wait(run, lambda: backend.states(job_ids), lease_s=rc.cluster.lease_s)
            if progress.complete or rc.merge.allow_partial:
                still = backend.wait_exited(job_ids) if progress.complete else []
                if still:
                    say(f"workers {', '.join(still)} are still exiting (they stop on their own; the run is complete)")
                jobs.add(run.fs, rc.cluster.backend, "launch", [], started=started, ended=time.time())
                break
            states = backend.states(job_ids)
            why = failures(run, states) or [f"task states: {states}"]
            stuck = (
                f"{progress.n_chunks - progress.chunks_done} of {progress.n_chunks} chunks are not done and no "
                f"worker is left:\n  "
            )
            if resubmits < rc.cluster.max_resubmits and job_ids and isolate.run_marker(run) != before:
                # the round got further (a chunk done, a range tried): workers died on what they
                # were generating, e.g. a record that kills the engine; the next round goes on
                resubmits += 1
                say(
                    stuck + "\n  ".join(why[:5]) + f"\nsubmitting again ({resubmits} of at most "
                    f"{rc.cluster.max_resubmits}, cluster.max_resubmits): a chunk whose workers keep dying is run "
                    f"alone and bisected to its poison record"
                )
                continue
            raise UserError(
                stuck + "\n  ".join(why) + f"\nLogs: {run.logs}. Fix the cause, then relaunch the same "
                f"command to resume (finished chunks are kept)."
            )
    summary = merge(
        run,
        rc.merge.format,
        rc.merge.allow_partial,
        None,
        rc.postprocess,
        rc.merge.on_error,
        group_by=list(rc.merge.group_by),
    )
    say(
        f"{summary.records} records -> {summary.results} ({summary.output_tokens:,} output tokens, "
        f"{summary.output_tokens_per_s:,.0f} tok/s over {summary.wall_s:.1f}s)"
    )
    say(f"summary: {run.summary}" + (f"   timeline: {run.root / summary.timeline}" if summary.timeline else ""))
    if summary.postprocess:
        sums = ", ".join(f"{k} {v:g}" for k, v in summary.postprocess["sums"].items())
        say(f"{summary.postprocess['target']} over {summary.postprocess['records']} records: {sums}")
        if summary.postprocess.get("metrics"):
            from .run.report import headline

            say(headline(summary.postprocess["metrics"]))
    from .run.report import write_report

    say(f"report: {write_report([run.root])}")
    note_in_sweep(run.root)
    report_errors(summary, say)
    return summary


def note_in_sweep(root) -> None:
    """In a Hydra multirun, list the run in the sweep folder's runs.txt: `hpc-infer report
    runs/.multirun` then shows the whole sweep side by side. Added through the folder's
    pinned handle (entry.pin_sweep_dir), never through a link in the file's place."""
    from .entry import SWEEP

    if SWEEP is not None:
        try:
            SWEEP.append("runs.txt", f"{root}\n".encode())
        except (OSError, ValueError) as e:  # a link or a foreign file in its place: refused, said
            say(f"not listed in the sweep's runs.txt ({e})")


def hydra_task(cfg: DictConfig) -> None:
    """The command's work on Hydra's composed config (cli.py runs it through entry.run_hydra)."""
    launch(to_run_config(cfg), OmegaConf.to_yaml(cfg, resolve=True))


def main() -> None:
    run_hydra(hydra_task, "hpc-infer launch")


if __name__ == "__main__":
    main()
