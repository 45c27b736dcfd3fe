"""The Hydra door shared by `launch`, `sbatch` and `serve` (`hpc-infer launch|sbatch|serve`).

Secrets on the command line are refused before Hydra runs, so Hydra can neither echo
them in an error nor write them to multirun.yaml; the composed config is then checked
for unknown keys and secrets before any step writes a file.
"""

from __future__ import annotations

import functools
import os
import stat
import sys
from pathlib import Path
from typing import Any, Callable

import hydra
from omegaconf import DictConfig

from .config import PACKAGE_DIR, register_configs
from .errors import UserError
from .secrets import refuse_secret_overrides

register_configs()


def _umask_for(argv: list[str]) -> None:
    """What Hydra writes itself (a multirun's .multirun/multirun.yaml) follows `permissions`
    like the run's own files: private unless the command line says group or umask."""
    from .rundir import set_permissions

    chosen = [a.split("=", 1)[1] for a in argv if a.lstrip("+").startswith("permissions=")]
    set_permissions(chosen[-1] if chosen else "private")


GROUPS = ("model", "cluster", "sampling", "data")


def _group_options(group: str, config_dirs: list[str]) -> list[str]:
    dirs = [PACKAGE_DIR / "conf" / group] + [Path(d).expanduser() / group for d in config_dirs]
    return sorted({p.stem for d in dirs if d.is_dir() for p in d.glob("*.yaml")})


def check_overrides(argv: list[str]) -> list[str]:
    """Our one door for what Hydra would answer with its own words and exit 1: a misspelt
    key (with or without `+`) gets the nearest valid key, a misspelt group option the
    nearest option, a word where a number or boolean belongs the field's type, before
    Hydra composes anything."""
    import difflib

    from .config import RunConfig, unknown_keys, wrong_types

    config_dirs = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--config-dir", "-cd")]
    config_dirs += [a.split("=", 1)[1] for a in argv if a.startswith("--config-dir=")]
    multirun = any(a in ("-m", "--multirun") for a in argv)
    problems = []
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        if key.startswith("hydra.") or key == "hydra" or "@" in key:
            continue
        if key in GROUPS:
            options = _group_options(key, config_dirs)
            for choice in (v.strip() for v in value.split(",")):
                if choice and options and choice not in options:
                    near = difflib.get_close_matches(choice, options, n=1, cutoff=0.5)
                    problems.append(
                        f"{key}={choice}: no such {key} config; "
                        + (f"did you mean {key}={near[0]}? " if near else "")
                        + f"(options: {', '.join(options)})"
                    )
            continue
        for one in _swept(arg) if multirun else [value]:  # each value of a sweep has the field's type
            tree: dict = {}
            node = tree
            parts = key.split(".")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = one
            found = unknown_keys(tree, RunConfig) or wrong_types(tree, RunConfig)
            problems += [f for f in found if f not in problems]
    return problems


def _swept(arg: str) -> list[str]:
    """The values a multirun sweeps `arg` over (`seed=1,2`: 1 and 2), as Hydra's parser reads
    them; the value itself when it does not sweep."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    value = arg.split("=", 1)[1]
    try:
        ov = OverridesParser.create().parse_override(arg)
        if ov.is_sweep_override() and ov.is_discrete_sweep():
            return list(ov.sweep_string_iterator())
    except Exception:
        pass
    return [value]


def _free_form(key: str) -> bool:
    """The key goes inside a free-form field (cluster.env.X, model.engine_kwargs.X, ...)."""
    import dataclasses
    import typing

    from .config import RunConfig

    schema: Any = RunConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(schema):
            return i < len(parts)
        hints = typing.get_type_hints(schema)
        if part not in hints:
            return False
        schema = hints[part]
    return False


def add_free_form(argv: list[str]) -> list[str]:
    """`cluster.env.FOO=1` means "set FOO", whether or not the chosen config has it: Hydra
    wants `+` for a new key, `++` for either; give it `++` (a key of a typed group is
    checked by check_overrides instead)."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and not arg.startswith(("-", "+", "~")) and not key.startswith("hydra") and _free_form(key):
            arg = f"++{arg}"
        out.append(arg)
    return out


def expand_home(argv: list[str]) -> list[str]:
    """`data.path=~/prompts.jsonl`: the shell leaves `~` after `key=` alone and Hydra's parser
    refuses it; expand it as a user means it (quoted, so the path reaches Hydra as typed)."""
    import os

    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and not arg.startswith("-") and (value == "~" or value.startswith("~/")):
            path = os.path.expanduser(value)
            arg = f"{key}='{path}'" if "'" not in path else f"{key}={path}"
        out.append(arg)
    return out


WRITTEN_BY_HYDRA = (
    "hydra.run.dir",
    "hydra.sweep.dir",
    "hydra.sweep.subdir",
    "hydra.output_subdir",
    "hydra.job.name",
    "output_root",
    "run_name",
)


def _sweep_points(argv: list[str]) -> list[list[str]]:
    """The overrides of every job a multirun would start (`a=1,2 b=x,y`: four), expanded by
    Hydra's own parser and basic sweeper; one list when nothing sweeps, or without
    --multirun. Hydra composes each job's config, so each is checked: a point after the
    first may hold what the first does not (`hydra.sweep.subdir=${oc.env:X${hydra.job.num}}`)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = [a for a in argv if not a.startswith("-") and "=" in a]
    if not any(a in ("-m", "--multirun") for a in argv):
        return [args]  # one job: Hydra composes the overrides as given
    try:
        parsed = OverridesParser.create().parse_overrides(args)
        return BasicSweeper.split_arguments(parsed, None)[0] or [[]]
    except Exception:  # Hydra itself will say what is wrong (a range or interval sweep included)
        return [args]


SWEEP = None  # the multirun's sweep folder, pinned: Hydra writes into it by /proc/self/fd/N


def pin_sweep_dir(sweep: str) -> str:
    """The sweep folder Hydra writes multirun.yaml (and each job's folder) into, and launch
    adds runs.txt to: made if missing, judged as the caller's own (rundir/trust.py: a folder
    someone else made or can write, or a link in its place, is refused, naming it), and
    pinned: Hydra is given `/proc/self/fd/N` of the judged folder, so a folder swapped in at
    its path afterwards (by whoever can write its parent) is never written. Returns the
    override that points Hydra there."""
    global SWEEP
    from .rundir import trust

    path = Path(sweep).expanduser()
    path = path if path.is_absolute() else Path.cwd() / path
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir()
    except FileExistsError:
        pass
    SWEEP = trust.open_dir(
        path, "hydra.sweep.dir", trust.OWN, fix="give the sweep a folder of your own: hydra.sweep.dir=..."
    )
    for name in ("multirun.yaml", "runs.txt"):  # Hydra writes the first by path; we add to the second
        st = SWEEP.stat(name)
        if st is None:
            continue
        bad = not stat.S_ISREG(st.mode) or st.nlink != 1
        try:
            os.close(SWEEP.open_file(name))  # the rule, on its descriptor (owner, mode, ACL): UserError
        except ValueError:  # DamagedFile: a link in its place
            bad = True
        if bad:
            raise UserError(
                f"hydra.sweep.dir: {path}/{name} is a link (or not a file of this folder's own), which would "
                f"be written through; remove it, or give the sweep another folder: hydra.sweep.dir=..."
            )
    return f"hydra.sweep.dir={SWEEP.fd_path()}"


def check_before_hydra_writes(argv: list[str]) -> list[str]:
    """What Hydra writes before our task runs (the output directories it names, .hydra/,
    multirun.yaml) comes from the composed config resolved: compose it first and refuse a
    secret in those values (hydra.run.dir=${oc.env:...}, output_root from a cluster file).
    Composition problems are left for Hydra to report, values for to_run_config (redacted).
    In a multirun, the sweep folder is judged and pinned (pin_sweep_dir); returns the
    overrides to add for Hydra."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from .secrets import SECRET_ADVICE, known_secrets, secrets_in_resolved

    config_dirs = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--config-dir", "-cd")]
    config_dirs += [a.split("=", 1)[1] for a in argv if a.startswith("--config-dir=")]
    extra = []
    if config_dirs:
        dirs = ",".join(f"file://{Path(d).expanduser().resolve()}" for d in config_dirs)
        extra.append(f"hydra.searchpath=[{dirs}]")
    multirun = any(a in ("-m", "--multirun") for a in argv)
    points = _sweep_points(argv)
    secrets = known_secrets()
    sweep_dir = None
    with initialize_config_dir(config_dir=str(PACKAGE_DIR / "conf"), version_base=None):
        for num, point in enumerate(points):
            # what Hydra sets for each job at run time (hydra.job.num, .id), set as it will be
            job = [f"hydra.job.num={num}", f"hydra.job.id={num}"] if multirun else []
            try:
                cfg = compose(config_name="config", overrides=point + extra + job, return_hydra_config=True)
            except Exception:
                return []  # Hydra itself will say what is wrong (its message holds no resolved value)
            found = []
            for key in WRITTEN_BY_HYDRA:
                try:
                    value = OmegaConf.select(cfg, key, throw_on_resolution_failure=True)
                except Exception:  # set only at run time: Hydra fills it; not a secret from here
                    continue
                found += [key] if secrets_in_resolved(value, secrets) else []
            if found:
                where = f" (sweep job {num} of {len(points)})" if multirun and len(points) > 1 else ""
                raise UserError(
                    f"{', '.join(found)}{where}: resolves to a secret, which would name a directory or a file; "
                    f"{SECRET_ADVICE} (value not shown)"
                )
            if multirun and sweep_dir is None:
                try:
                    sweep_dir = str(OmegaConf.select(cfg, "hydra.sweep.dir", throw_on_resolution_failure=True))
                except Exception:
                    sweep_dir = ""
    return [pin_sweep_dir(sweep_dir)] if sweep_dir else []


def run_hydra(task: Callable[[DictConfig], None], command: str) -> None:
    """Run `task(cfg)` on the composed config; a UserError anywhere is one `error:` line, exit 2.
    `command` ("hpc-infer serve") names the program in `--help` (Hydra would say the module's name)."""

    @functools.wraps(task)
    def guarded(cfg: DictConfig) -> None:
        try:
            task(cfg)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(e.exit_code)

    sys.argv[1:] = add_free_form(expand_home(sys.argv[1:]))
    try:
        refuse_secret_overrides(sys.argv[1:])
        problems = check_overrides(sys.argv[1:])
        if problems:
            raise UserError("invalid configuration:\n  " + "\n  ".join(problems))
        if not any(a in ("--help", "-h", "--info", "-i", "--cfg", "-c") for a in sys.argv[1:]):
            sys.argv.extend(check_before_hydra_writes(sys.argv[1:]))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    _umask_for(sys.argv[1:])
    if any(a in ("--help", "-h") for a in sys.argv[1:]):
        sys.argv.append(f"hydra.help.app_name='{command}'")
    # absolute: the task may live in a subpackage (serve/), and the console script must find it too
    hydra.main(config_path=str(PACKAGE_DIR / "conf"), config_name="config", version_base=None)(guarded)()
