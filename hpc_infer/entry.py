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


def run_hydra(task: Callable[[DictConfig], None], command: str) -> None:
    """Run `task(cfg)` on the composed config; a UserError anywhere is one `error:` line, exit 2.
    `command` ("hpc-infer serve") names the program in `--help` (Hydra would say the module's name)."""

    @functools.wraps(task)
    def guarded(cfg: DictConfig) -> None:
        try:
            task(cfg)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    try:
        refuse_secret_overrides(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if any(a in ("--help", "-h") for a in sys.argv[1:]):
        sys.argv.append(f"hydra.help.app_name='{command}'")
    # absolute: the task may live in a subpackage (serve/), and the console script must find it too
    hydra.main(config_path=str(PACKAGE_DIR / "conf"), config_name="config", version_base=None)(guarded)()
