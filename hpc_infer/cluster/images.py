"""`hpc-infer image pull|build|inspect`: get the cluster's vLLM image in place and check it.

Commands are built here (so `--dry-run` prints exactly what would run) and run through
spython's command runner, which streams the runtime's output. Without apptainer or
singularity on PATH (a login node without it, or these CI machines) pull and build stop
with a message naming what is missing; inspect still checks the file is a SIF image.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .container import runtime_on_path
from ..errors import UserError

URI = re.compile(r"^(docker|docker-archive|library|oras|shub|https)://\S+$")
SIF_MAGIC = b"SIF_MAGIC"
DEFAULT_DEF = Path(__file__).resolve().parents[2] / "containers" / "vllm-hpc_infer.def"


def _need_runtime(prefer: str | None) -> str:
    found = runtime_on_path(prefer)
    if not found:
        raise UserError(
            "no apptainer or singularity on PATH here. Run this on a node that has one (often "
            "`module load apptainer`), or ask the cluster admins for the shared image; "
            "--dry-run prints the command"
        )
    return found


def pull_command(uri: str, dest: Path, force: bool = False, prefer: str | None = None) -> list[str]:
    if not URI.match(uri):
        raise UserError(
            f"{uri}: not an image address; write docker://vllm/vllm-openai:<tag> (or library://, oras://, https://)"
        )
    if dest.suffix != ".sif":
        raise UserError(f"--dest {dest}: name the image file, ending in .sif")
    if dest.exists() and not force:
        raise UserError(f"{dest} exists; pass --force to replace it")
    return [runtime_on_path(prefer) or "apptainer", "pull", *(["--force"] if force else []), str(dest), uri]


def build_command(
    definition: Path, dest: Path, fakeroot: bool = True, force: bool = False, prefer: str | None = None
) -> list[str]:
    if not definition.is_file():
        raise UserError(f"definition file {definition} does not exist (the project's is {DEFAULT_DEF})")
    if dest.suffix != ".sif":
        raise UserError(f"--dest {dest}: name the image file, ending in .sif")
    if dest.exists() and not force:
        raise UserError(f"{dest} exists; pass --force to replace it")
    return [
        runtime_on_path(prefer) or "apptainer",
        "build",
        *(["--fakeroot"] if fakeroot else []),
        *(["--force"] if force else []),
        str(dest),
        str(definition),
    ]


def run(cmd: list[str], prefer: str | None = None) -> None:
    """Run a pull/build command through spython, streaming its output; fail clearly."""
    from spython.utils import stream_command

    _need_runtime(prefer)
    Path(cmd[-2]).parent.mkdir(parents=True, exist_ok=True)
    try:
        for line in stream_command(cmd):
            print(line, end="")
    except Exception as e:  # spython raises on a non-zero exit
        raise UserError(f"`{' '.join(cmd)}` failed ({e}); see its output above") from None


@dataclass
class ImageInfo:
    path: str
    size_mb: float
    sif: bool
    runtime: str | None
    labels: dict = field(default_factory=dict)
    vllm_version: str | None = None
    note: str = ""


def inspect(image: Path, prefer: str | None = None) -> ImageInfo:
    """File checks (exists, SIF header) always; labels and vLLM version where a runtime exists."""
    if not image.is_file():
        raise UserError(f"{image}: no such image file; pull it with `hpc-infer image pull docker://... --dest {image}`")
    with open(image, "rb") as f:
        head = f.read(128)
    if SIF_MAGIC not in head:
        raise UserError(
            f"{image}: not a SIF image (no SIF header); a sandbox directory or a docker tarball "
            f"must be converted with `apptainer build {image.with_suffix('.sif').name} {image}`"
        )
    info = ImageInfo(str(image), round(image.stat().st_size / 1e6, 1), True, runtime_on_path(prefer))
    if not info.runtime:
        info.note = "no apptainer/singularity here: labels and the vLLM version were not read"
        return info
    import subprocess

    p = subprocess.run([info.runtime, "inspect", "--json", "--labels", str(image)], capture_output=True, text=True)
    if p.returncode == 0:
        try:
            info.labels = json.loads(p.stdout).get("data", {}).get("attributes", {}).get("labels", {}) or {}
        except json.JSONDecodeError:
            info.note = "labels unreadable"
    p = subprocess.run(
        [info.runtime, "exec", str(image), "python3", "-c", "import vllm; print(vllm.__version__)"],
        capture_output=True,
        text=True,
    )
    info.vllm_version = p.stdout.strip() if p.returncode == 0 else None
    if info.vllm_version is None:
        info.note = f"`python3 -c 'import vllm'` failed in the image: {p.stderr.strip()[-300:]}"
    return info
