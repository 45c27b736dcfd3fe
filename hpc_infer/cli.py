"""`hpc-infer`: launch, status, cancel, merge, report, sbatch, cache, image, model.

hpc-infer launch model=qwen_math cluster=together data=math_r1_zero
hpc-infer status runs/<run>          hpc-infer cancel runs/<run>
hpc-infer merge runs/<run> [--partial] [--format parquet]
hpc-infer sbatch model=... cluster=...   (writes a standalone sbatch script)
hpc-infer serve model=... cluster=... [serve.replicas=N]   (OpenAI-compatible vLLM servers)
hpc-infer serve status [RUN]            hpc-infer serve stop RUN
hpc-infer serve metrics RUN [--json]    hpc-infer serve scale RUN N
hpc-infer cache stage|list|verify|catalog --root /shared/models   (admins)
hpc-infer cache shard MODEL --root /shared/models --tp N   (a sharded_state copy for TP=N)
hpc-infer image pull docker://vllm/vllm-openai:TAG --dest /shared/vllm.sif | build | inspect IMAGE
hpc-infer model build-cpu               (build the embedded CPU default model now)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import UserError


def _run_dir(path: str, command: str, need: str):
    """The run directory a command was given, checked by the trust rule (rundir/trust.py):
    `need=own` to act on it (cancel, merge into it), `shared` to read it as data (status, a
    teammate's group run). Returns the run and its level."""
    from .rundir import SUBDIRS, RunDir, trust

    run = RunDir(Path(path).expanduser().resolve())
    if not run.manifest.exists():
        raise UserError(f"{path}: not a run directory (no manifest.json)")
    level = trust.check_tree(run.root, f"hpc-infer {command}", need, SUBDIRS)
    trust.check(run.manifest, f"hpc-infer {command}", need)
    return run, level


def cmd_status(args) -> int:
    from .cluster.submit import recorded_backend
    from .run.progress import describe

    run, _ = _run_dir(args.run_dir, "status", "shared")
    backend, ids = recorded_backend(run)
    print(describe(run, backend.states(ids)))
    return 0


def cmd_cancel(args) -> int:
    from .cluster.submit import recorded_backend

    run, _ = _run_dir(args.run_dir, "cancel", "own")
    backend, ids = recorded_backend(run)
    what = backend.cancel(ids)
    print(f"cancelled {len(ids)} tasks of {run.root} ({what}); relaunch the same command to resume later")
    return 0


def _run_config(run, need: str) -> dict:
    """The config the run was launched with (its config.yaml), unresolved, read as data."""
    from omegaconf import OmegaConf

    from .rundir import trust

    if not run.config.exists():
        return {}
    text = trust.read_bytes(run.config, "hpc-infer merge: the run's config.yaml", need).decode()
    if not text.strip():
        return {}
    try:
        cfg = OmegaConf.to_container(OmegaConf.create(text), resolve=False)
    except Exception as e:
        raise UserError(
            f"{run.config}: not a config hpc_infer wrote ({type(e).__name__}); merge with "
            f"--no-postprocess and --format/--on-error given, or relaunch to rewrite it"
        ) from None
    return cfg if isinstance(cfg, dict) else {}


def shipped_hook(target: str) -> bool:
    """`target` names a function this package ships as a hook, itself: resolved, defined in
    one of SHIPPED_HOOKS' modules under exactly that name (a text prefix would let
    `hpc_infer.rewards.os.system` through, an attribute the module merely imports)."""
    import inspect

    from hydra._internal.utils import _locate

    from .config import SHIPPED_HOOKS

    if not target.startswith(SHIPPED_HOOKS):
        return False
    try:
        obj = _locate(target)
    except Exception:
        return False
    return (
        inspect.isfunction(obj)
        and obj.__module__.startswith(tuple(s.rstrip(".") for s in SHIPPED_HOOKS))
        and f"{obj.__module__}.{obj.__qualname__}" == target
    )


def _run_postprocess(cfg: dict, level: str, typed: str | None) -> dict | None:
    """The merge hook: one the caller typed (--postprocess), else the run's own. A hook is
    code: from a run the caller does not own (a teammate's group run), only a hook this
    package ships runs, with plain values as its arguments; any other is named and skipped."""
    from .config import SHIPPED_HOOKS, choose_postprocess

    if typed:
        return {"_target_": typed}
    spec = (
        choose_postprocess((cfg.get("merge") or {}).get("postprocess"), (cfg.get("data") or {}).get("postprocess"))
        if cfg
        else None
    )
    if not spec or level == "own":
        return spec
    target = str(spec.get("_target_"))
    plain = all(isinstance(v, (str, int, float, bool, type(None))) for k, v in spec.items())
    if shipped_hook(target) and plain:
        return spec
    print(
        f"[hpc_infer] the run's merge hook {target} was not run: this run is not yours, and only hooks hpc_infer "
        f"ships ({', '.join(SHIPPED_HOOKS)}*) run from another's run; give it yourself with --postprocess "
        f"{target} if you trust it",
        file=sys.stderr,
    )
    return None


def cmd_merge(args) -> int:
    from .run.merge import merge, report_errors

    run, level = _run_dir(args.run_dir, "merge", "shared")
    if (level != "own" or not os.access(run.root, os.W_OK)) and not args.out:
        raise UserError(
            f"hpc-infer merge {args.run_dir}: the run is not yours (you may read it, not write into it); "
            f"merge into a folder of yours: hpc-infer merge {args.run_dir} --out DIR"
        )
    cfg = _run_config(run, level)
    on_error = args.on_error or (cfg.get("merge") or {}).get("on_error") or "keep"
    fmt = args.format or (cfg.get("merge") or {}).get("format") or "jsonl"
    s = merge(
        run,
        fmt,
        args.partial,
        postprocess=None if args.no_postprocess else _run_postprocess(cfg, level, args.postprocess),
        on_error=on_error,
        dest=Path(args.out).expanduser().resolve() if args.out else None,
        group_by=args.group_by.split(",") if args.group_by else list((cfg.get("merge") or {}).get("group_by") or []),
    )
    print(f"{s.records}/{s.records_expected} records -> {s.results}")
    if s.postprocess and s.postprocess.get("metrics"):
        from .run.report import headline

        print(headline(s.postprocess["metrics"]))
    if s.postprocess:  # the same reward line launch prints
        sums = ", ".join(f"{k} {v:g}" for k, v in s.postprocess["sums"].items())
        print(f"{s.postprocess['target']} over {s.postprocess['records']} records: {sums}")
    report_errors(s, lambda line: print(line, file=sys.stderr))
    return 0


def cmd_report(args) -> int:
    from .run.report import write_report

    print(write_report([Path(p) for p in args.runs], Path(args.out).expanduser() if args.out else None))
    return 0


def cmd_cache(args) -> int:
    from .log import printable
    from .models import cache_admin

    if args.action == "stage":
        if not args.source:
            raise UserError("cache stage needs SOURCE (a model directory or a Hugging Face id)")
        print(cache_admin.stage(args.source, args.root, args.name, args.hf_id, args.revision))
    elif args.action == "list":
        entries = cache_admin.list_models(args.root)
        print(f"{'name':32} {'size':>10}  {'mode':11} {'readable by':12} hf_id / path")
        for e in entries:
            who = "all" if e.world_readable else ("group" if e.group_readable else "owner")
            print(f"{e.name:32} {e.size_bytes / 2**30:8.2f}Gi  {e.mode:11} {who:12} {e.hf_id or '-'}  {e.path}")
            if e.problem:
                print(f"  refused: {printable(e.problem)}")
    elif args.action == "verify":
        fs = cache_admin.open_root(args.root)
        try:
            names = [args.source] if args.source else cache_admin.model_names(fs)
            root_uid = fs.stat().uid
            bad = 0
            for name in names:
                try:
                    refused = cache_admin.model_entry(fs, root_uid, name).problem if fs.stat(name) else None
                    problems = [refused] if refused else cache_admin.verify_model(fs, name)
                except ValueError as e:  # a name that would leave the root
                    problems = [str(e)]
                bad += bool(problems)
                print(f"{printable(name)}: {'OK' if not problems else 'BROKEN'}")
                for p in problems:
                    print(f"  {printable(p)}")
        finally:
            fs.close()
        return 1 if bad else 0
    elif args.action == "catalog":
        print(cache_admin.write_catalog(args.root))
    elif args.action == "shard":
        if not args.source:
            raise UserError("cache shard needs SOURCE (a model directory, or a model's name under --root)")
        out = cache_admin.shard(args.source, args.root, args.tp, args.pp, args.name, args.dtype)
        print(out)
        print(
            f"[hpc_infer] load it with model.path={out} model.load_format=sharded_state "
            f"model.tensor_parallel_size={args.tp}"
            + (f" model.pipeline_parallel_size={args.pp}" if args.pp > 1 else ""),
            file=sys.stderr,
        )
    return 0


def cmd_cluster(args) -> int:
    from .cluster.detect import detect

    target, site = detect(args.name, Path(args.config_dir), Path(args.output_root), args.force)
    print(target)
    read = [f"{len(site.partitions)} partition(s)"] + (["MaxArraySize"] if site.max_array_size else [])
    read += ["your accounts and QOS"] if site.accounts is not None else []
    print(f"read: {', '.join(read)}; not read: {len(site.unread)} (listed at the end of the file)", file=sys.stderr)
    for line in site.unread:
        print(f"  not read: {line}", file=sys.stderr)
    print(f"use it: hpc-infer launch --config-dir {args.config_dir} cluster={args.name}", file=sys.stderr)
    return 0


def cmd_model(args) -> int:
    from .models.cpu_model import ensure_smollm2

    print(ensure_smollm2())
    return 0


def cmd_image(args) -> int:
    from dataclasses import asdict

    from .cluster import images

    if args.action == "inspect":
        if not args.target:
            raise UserError("image inspect: give the image file, e.g. hpc-infer image inspect /shared/vllm.sif")
        print(json.dumps(asdict(images.inspect(Path(args.target), args.runtime)), indent=1))
        return 0
    if args.action == "pull":
        if not args.target or not args.dest:
            raise UserError(
                "image pull: give the address and --dest, e.g. "
                "hpc-infer image pull docker://vllm/vllm-openai:latest --dest /shared/vllm.sif"
            )
        cmd = images.pull_command(args.target, Path(args.dest), args.force, args.runtime)
    else:
        if not args.dest:
            raise UserError("image build: give --dest /shared/vllm-hpc_infer.sif")
        cmd = images.build_command(
            Path(args.target or images.DEFAULT_DEF), Path(args.dest), not args.no_fakeroot, args.force, args.runtime
        )
    print(" ".join(cmd))
    if not args.dry_run:
        images.run(cmd, args.runtime)
    return 0


def _serve_admin(argv: list[str]) -> int:
    """`serve metrics RUN ...` and `serve scale RUN N`."""
    p = argparse.ArgumentParser(prog=f"hpc-infer serve {argv[0]}")
    p.add_argument("run", help="the serve run directory (runs/serve__...)")
    if argv[0] == "scale":
        p.add_argument("n", type=int, help="how many replicas should be live")
    else:
        p.add_argument("--json", action="store_true", help="one JSON object per sample")
        p.add_argument("--once", action="store_true", help="one sample, then exit (the default off a terminal)")
        p.add_argument("--watch", action="store_true", help="keep sampling off a terminal too (JSON lines with --json)")
        p.add_argument("--interval", type=float, default=2.0, help="seconds between the two reads of a sample")
    args = p.parse_args(argv[1:])
    try:
        if argv[0] == "scale":
            from .serve.fleet import scale

            print(scale(args.run, args.n))
            return 0
        from .serve.metrics import watch

        if args.interval <= 0:
            raise UserError(f"--interval {args.interval}: give seconds > 0")
        return watch(args.run, args.interval, once=args.once, as_json=args.json, repeat=args.watch)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


# the commands whose settings are Hydra's config groups: command -> the module with its hydra_task
HYDRA_COMMANDS = {
    "launch": "hpc_infer.launch",
    "sbatch": "hpc_infer.run.sbatch",
    "serve": "hpc_infer.serve.launch",
    "tune": "hpc_infer.tune",
    "doctor": "hpc_infer.doctor",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"] and argv[1:2] and argv[1] in ("metrics", "scale"):
        return _serve_admin(argv[1:])
    if argv[:1] == ["serve"] and argv[1:2] and argv[1] in ("status", "stop"):
        from .serve import status as serve_status

        try:
            if argv[1] == "status":
                print(serve_status.status(argv[2] if len(argv) > 2 else None))
            else:
                if len(argv) < 3:
                    raise UserError("serve stop: give the serve run directory, e.g. hpc-infer serve stop runs/serve__x")
                print(serve_status.stop(argv[2]))
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    if argv and argv[0] in HYDRA_COMMANDS:
        # Hydra parses its own command line: hand the rest of it over.
        import importlib

        from .entry import run_hydra

        command = f"hpc-infer {argv[0]}"
        sys.argv = [command, *argv[1:]]
        run_hydra(importlib.import_module(HYDRA_COMMANDS[argv[0]]).hydra_task, command)
        return 0
    parser = argparse.ArgumentParser(
        prog="hpc-infer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("status", help="per-task state, chunks done, tokens/s, ETA")
    p.add_argument("run_dir")
    p.set_defaults(fn=cmd_status)
    p = sub.add_parser("cancel", help="cancel the run's jobs (resumable)")
    p.add_argument("run_dir")
    p.set_defaults(fn=cmd_cancel)
    p = sub.add_parser("merge", help="merge finished chunks into results")
    p.add_argument("run_dir")
    p.add_argument("--partial", action="store_true", help="merge what is done; missing chunks listed in summary.json")
    p.add_argument(
        "--format",
        default=None,
        choices=["jsonl", "parquet", "openai_batch"],
        help="result format (default: the run's merge.format)",
    )
    p.add_argument("--no-postprocess", action="store_true", help="skip the run's merge.postprocess hook")
    p.add_argument(
        "--postprocess", default=None, metavar="MODULE.FUNCTION", help="run this merge hook instead of the run's"
    )
    p.add_argument(
        "--group-by",
        default=None,
        metavar="FIELD[,FIELD]",
        help="report the hook's metrics per value of these record fields (default: the run's merge.group_by)",
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="write results and summary into DIR (needed for a run that is not yours)",
    )
    p.add_argument(
        "--on-error",
        choices=["keep", "drop", "fail"],
        default=None,
        help="records the engine refused: keep them as error records (default: the run's "
        "merge.on_error), drop them from the results, or fail (exit 3)",
    )
    p.set_defaults(fn=cmd_merge)
    p = sub.add_parser(
        "report", help="one self-contained HTML page of a run's metrics and outputs (or runs side by side)"
    )
    p.add_argument("runs", nargs="+", help="run directories, or a sweep folder (runs/.multirun/<sweep>)")
    p.add_argument(
        "--out", default=None, metavar="FILE", help="where to write it (default: report.html beside the results)"
    )
    p.set_defaults(fn=cmd_report)
    p = sub.add_parser("cache", help="shared model cache (admins): stage, list, verify, catalog, shard")
    p.add_argument("action", choices=["stage", "list", "verify", "catalog", "shard"])
    p.add_argument(
        "source",
        nargs="?",
        help="stage: model directory or HF id; verify: one model name; shard: model directory or name under --root",
    )
    p.add_argument("--tp", type=int, default=1, help="shard: tensor_parallel_size the copy is for")
    p.add_argument("--pp", type=int, default=1, help="shard: pipeline_parallel_size the copy is for")
    p.add_argument("--dtype", default="auto", help="shard: dtype the weights are written in")
    p.add_argument("--root", required=True, help="the shared model root, e.g. /data/models")
    p.add_argument("--name", default=None)
    p.add_argument("--hf-id", default=None)
    p.add_argument("--revision", default=None)
    p.set_defaults(fn=cmd_cache)
    p = sub.add_parser("image", help="container image: pull, build (containers/*.def), inspect")
    p.add_argument("action", choices=["pull", "build", "inspect"])
    p.add_argument("target", nargs="?", help="pull: docker://... address; build: .def file; inspect: .sif file")
    p.add_argument("--dest", default=None, help="the .sif file to write (pull, build)")
    p.add_argument("--runtime", default=None, choices=["apptainer", "singularity"])
    p.add_argument("--force", action="store_true", help="replace an existing image file")
    p.add_argument("--no-fakeroot", action="store_true", help="build as root instead of with --fakeroot")
    p.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    p.set_defaults(fn=cmd_image)
    p = sub.add_parser(
        "cluster", help="cluster detect [NAME]: read the site (Slurm, runtimes, file systems) into a config"
    )
    p.add_argument("action", choices=["detect"])
    p.add_argument("name", nargs="?", default="site", help="the config's name (cluster=NAME)")
    p.add_argument("--config-dir", default="conf", help="writes CONFIG_DIR/cluster/NAME.yaml (default: ./conf)")
    p.add_argument("--output-root", default="runs", help="where runs will go: its file system is reported")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.set_defaults(fn=cmd_cluster)
    p = sub.add_parser("model", help="embedded CPU model")
    p.add_argument("action", choices=["build-cpu"])
    p.set_defaults(fn=cmd_model)
    sub.add_parser("launch", help="plan, submit, wait, merge (Hydra overrides follow)")
    sub.add_parser("tune", help="time engine settings on a sample of the run's prompts; launch uses the fastest")
    sub.add_parser("sbatch", help="render the run as a standalone sbatch script (Hydra overrides follow)")
    sub.add_parser(
        "doctor",
        help="one short job as the run would get it: GPUs, vLLM, model, token, file system (Hydra overrides follow)",
    )
    sub.add_parser(
        "serve",
        help="OpenAI-compatible vLLM servers (Hydra overrides follow); serve status|stop|metrics RUN, "
        "serve scale RUN N",
    )
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
