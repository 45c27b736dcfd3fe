"""The Hydra door shared by `launch`, `sbatch` and `serve` (`hpc-infer launch|sbatch|serve`).

Secrets on the command line are refused before Hydra runs, so Hydra can neither echo
them in an error nor write them to multirun.yaml; the composed config is then checked
for unknown keys and secrets before any step writes a file.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable

import hydra
from omegaconf import DictConfig

from .config import PACKAGE_DIR, register_configs
from .errors import UserError
from .secrets import refuse_secret_overrides

register_configs()


def _umask_for(argv: list[str]) -> None:
    """What Hydra writes itself (a multirun's .multirun/multirun.yaml) follows `permissions`
    like the run's own files: private unless the command line says group or umask."""
    import os

    chosen = [a.split("=", 1)[1] for a in argv if a.lstrip("+").startswith("permissions=")]
    mode = chosen[-1] if chosen else "private"
    if mode == "private":
        os.umask(0o077)
    elif mode == "group":
        os.umask(0o027)


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

    try:
        refuse_secret_overrides(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    _umask_for(sys.argv[1:])
    if any(a in ("--help", "-h") for a in sys.argv[1:]):
        sys.argv.append(f"hydra.help.app_name='{command}'")
    # absolute: the task may live in a subpackage (serve/), and the console script must find it too
    hydra.main(config_path=str(PACKAGE_DIR / "conf"), config_name="config", version_base=None)(guarded)()
