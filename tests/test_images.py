"""`hpc-infer image`: exact commands, clear refusals, SIF checks.

No container runtime can be installed on these machines (none is packaged for Debian 12
here), so pull and build are checked by the exact command `--dry-run` prints and by the
message when no runtime is on PATH; where apptainer exists the same code runs it.
"""

import json
import shutil
import subprocess

import pytest

from conftest import BIN, ROOT


def hpc_infer(*args, path=None):
    env = None
    if path is not None:
        import os

        env = dict(os.environ, PATH=path)
    return subprocess.run([str(BIN / "hpc-infer"), "image", *args], capture_output=True, text=True, cwd=ROOT, env=env)


def test_pull_and_build_print_the_exact_command(tmp_path):
    p = hpc_infer("pull", "docker://vllm/vllm-openai:v0.11.0", "--dest", str(tmp_path / "vllm.sif"), "--dry-run")
    assert p.returncode == 0, p.stderr
    runtime = shutil.which("apptainer") and "apptainer" or shutil.which("singularity") and "singularity" or "apptainer"
    assert p.stdout.strip() == f"{runtime} pull {tmp_path / 'vllm.sif'} docker://vllm/vllm-openai:v0.11.0"
    p = hpc_infer("build", "--dest", str(tmp_path / "h.sif"), "--dry-run")
    assert p.returncode == 0, p.stderr
    assert (
        p.stdout.strip() == f"{runtime} build --fakeroot {tmp_path / 'h.sif'} {ROOT / 'containers/vllm-hpc_infer.def'}"
    )


@pytest.mark.parametrize(
    "args, expected",
    [
        (["pull", "vllm/vllm-openai", "--dest", "x.sif"], "not an image address; write docker://"),
        (["pull", "docker://vllm/vllm-openai", "--dest", "x.img"], "ending in .sif"),
        (["pull", "docker://vllm/vllm-openai"], "give the address and --dest"),
        (["build", "/nonexistent.def", "--dest", "x.sif"], "definition file /nonexistent.def does not exist"),
        (["inspect", "/nonexistent.sif"], "no such image file; pull it with"),
    ],
)
def test_bad_arguments_refused_clearly(tmp_path, args, expected):
    p = hpc_infer(*args)
    assert p.returncode == 2 and expected in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_existing_image_needs_force(tmp_path):
    (tmp_path / "v.sif").write_bytes(b"old")
    p = hpc_infer("pull", "docker://vllm/vllm-openai", "--dest", str(tmp_path / "v.sif"), "--dry-run")
    assert p.returncode == 2 and "exists; pass --force" in p.stderr
    p = hpc_infer("pull", "docker://vllm/vllm-openai", "--dest", str(tmp_path / "v.sif"), "--dry-run", "--force")
    assert p.returncode == 0 and " --force " in p.stdout


def test_without_a_runtime_pull_stops_with_what_is_missing(tmp_path):
    p = hpc_infer("pull", "docker://vllm/vllm-openai", "--dest", str(tmp_path / "v.sif"), path="/nonexistent")
    assert p.returncode == 2 and "no apptainer or singularity on PATH" in p.stderr, p.stderr
    assert not (tmp_path / "v.sif").exists()


def test_inspect_checks_the_sif_header(tmp_path):
    bad = tmp_path / "bad.sif"
    bad.write_bytes(b"\x1f\x8b docker tarball, not SIF")
    p = hpc_infer("inspect", str(bad))
    assert p.returncode == 2 and "not a SIF image" in p.stderr
    good = tmp_path / "good.sif"  # the header a real SIF file starts with
    good.write_bytes(b"#!/usr/bin/env run-singularity\n" + b"SIF_MAGIC\x00" + b"\x00" * 200)
    p = hpc_infer("inspect", str(good), path="/usr/bin:/bin")
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert (
        info["sif"] is True and info["runtime"] is None and "labels and the vLLM version were not read" in info["note"]
    )
