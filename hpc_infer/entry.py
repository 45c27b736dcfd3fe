"""The Hydra door shared by `launch`, `sbatch` and `serve` (`hpc-infer launch|sbatch|serve`).

Secrets on the command line are refused before Hydra runs, so Hydra can neither echo
them in an error nor write them to multirun.yaml; the composed config is then checked
for unknown keys and secrets before any step writes a file.
"""

from __future__ import annotations

import functools
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
        tree: dict = {}
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
        problems += unknown_keys(tree, RunConfig) or wrong_types(tree, RunConfig)
    return problems


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


def _first_of_sweeps(argv: list[str]) -> list[str]:
    """The overrides with each sweep (`a=1,2`, `range(...)`) replaced by its first value:
    one point of a multirun, composed to check what Hydra would write for it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    out = []
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            ov = parser.parse_override(arg)
            if ov.is_sweep_override():
                first = next(iter(ov.sweep_string_iterator()), None)
                arg = f"{ov.get_key_element()}={first}" if first is not None else arg
        except Exception:
            pass
        out.append(arg)
    return out


def check_before_hydra_writes(argv: list[str]) -> None:
    """What Hydra writes before our task runs (the output directories it names, .hydra/,
    multirun.yaml) comes from the composed config resolved: compose it first and refuse a
    secret in those values (hydra.run.dir=${oc.env:...}, output_root from a cluster file).
    Composition problems are left for Hydra to report, values for to_run_config (redacted)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from .secrets import SECRET_ADVICE, known_secrets, secrets_in_resolved

    config_dirs = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--config-dir", "-cd")]
    config_dirs += [a.split("=", 1)[1] for a in argv if a.startswith("--config-dir=")]
    overrides = _first_of_sweeps(argv)
    if config_dirs:
        dirs = ",".join(f"file://{Path(d).expanduser().resolve()}" for d in config_dirs)
        overrides.append(f"hydra.searchpath=[{dirs}]")
    try:
        with initialize_config_dir(config_dir=str(PACKAGE_DIR / "conf"), version_base=None):
            cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    except Exception:
        return  # Hydra itself will say what is wrong (its message holds no resolved value)
    secrets = known_secrets()
    found = []
    for key in WRITTEN_BY_HYDRA:
        try:
            value = OmegaConf.select(cfg, key, throw_on_resolution_failure=True)
        except Exception:  # set only at run time (hydra.job.num): Hydra fills it; not a secret from here
            continue
        found += [key] if secrets_in_resolved(value, secrets) else []
    if found:
        raise UserError(
            f"{', '.join(found)}: resolves to a secret, which would name a directory or a file; "
            f"{SECRET_ADVICE} (value not shown)"
        )


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
            check_before_hydra_writes(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    _umask_for(sys.argv[1:])
    if any(a in ("--help", "-h") for a in sys.argv[1:]):
        sys.argv.append(f"hydra.help.app_name='{command}'")
    # absolute: the task may live in a subpackage (serve/), and the console script must find it too
    hydra.main(config_path=str(PACKAGE_DIR / "conf"), config_name="config", version_base=None)(guarded)()
