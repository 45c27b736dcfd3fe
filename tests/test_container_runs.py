"""Workers inside a container namespace, for real: hpc_infer's exec lines run through the
bubblewrap stand-in for Apptainer (tests/apptainer_standin/, checked against the Apptainer
docs in test_apptainer_standin.py) on an image shaped like a cluster's vLLM image: the
OS's own python3 with vLLM's CPU build and its dependency closure, nothing of the
checkout or of the test venv. What the worker needs reaches it only through the binds
hpc_infer passes. Apptainer itself cannot be installed here; the stand-in is not it."""

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import (
    ROOT,
    hold_env,
    preempt_then_finish,
    read_results,
    run_launch,
    run_line,
    sh,
    user_checkout,
    user_env,
)
from doc_commands import as_written
from hpc_infer.rundir import RunDir, read_json
from test_vllm_runs import _scan_cmdlines

STANDIN = Path(__file__).resolve().parent / "apptainer_standin"
sys.path.insert(0, str(STANDIN))
from image import build_from_def, build_image  # noqa: E402

needs_bwrap = pytest.mark.skipif(
    shutil.which("bwrap") is None and not os.environ.get("HPC_INFER_REQUIRE_SLURM"),
    reason="bubblewrap is not installed (scripts/setup.sh installs it as root: apt-get install bubblewrap)",
)
pytestmark = [needs_bwrap]
TINY = ("data=example_prompts", "data.limit=4", "sampling=greedy", "sampling.max_tokens=8")


@pytest.fixture(scope="module")
def vllm_image(tmp_path_factory):
    """Built by docs/containers.md's step 1 as written (the sandbox in this module's tmp dir)."""
    here = user_checkout(tmp_path_factory.mktemp("image"))
    dest = here.parent / "vllm-cpu-sandbox"
    p = run_line(
        here,
        as_written(
            ".venv/bin/python tests/apptainer_standin/image.py /tmp/vllm-sandbox", {"/tmp/vllm-sandbox": str(dest)}
        ),
        timeout=1200,
    )
    assert p.returncode == 0 and (dest / "usr").is_dir(), p.stderr[-3000:]
    return dest


def container_env(tmp_path, **extra):
    """The stand-in as `apptainer` on PATH, each call recorded."""
    return {
        "PATH": f"{STANDIN}:{os.environ['PATH']}",
        "APPTAINER_STANDIN_LOG": str(tmp_path / "apptainer-calls.jsonl"),
        **extra,
    }


def hf_cache_copy(model: str, hub: Path) -> Path:
    """The model in a Hugging Face cache layout: snapshot files are symlinks to ../../blobs."""
    repo = hub / "models--HuggingFaceTB--SmolLM2-135M-Instruct"
    snap = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for i, f in enumerate(sorted(Path(model).iterdir())):
        if f.is_file():
            blob = repo / "blobs" / f"blob{i}"
            shutil.copy(f, blob)
            (snap / f.name).symlink_to(f"../../blobs/{blob.name}")
    return snap


def check_secret_free(tmp_path, token, hits):
    assert hits == []
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink() and token.encode() in p.read_bytes()]
    assert leaked == []


@pytest.mark.slow
def test_local_run_contained_hf_cache_layout_token_only_in_worker(tmp_path, cpu_model, vllm_image):
    """`--contain` (private /tmp and $HOME): the model, in a Hugging Face cache layout under
    /tmp, is seen only through hpc_infer's binds, its blob symlinks included."""
    token = "hf_CONTAINER_" + os.urandom(8).hex()
    snap = hf_cache_copy(cpu_model, tmp_path / "hub")
    stop, hits = threading.Event(), []
    scanner = threading.Thread(target=_scan_cmdlines, args=(token, stop, hits), daemon=True)
    scanner.start()
    try:
        run_launch(
            tmp_path,
            "cluster=local",
            f"cluster.container.image={vllm_image}",
            "cluster.container.extra_args=[--contain]",
            f"model.path={snap}",
            *TINY,
            env=container_env(tmp_path, HF_TOKEN=token),
        )
    finally:
        stop.set()
        scanner.join()
    run = RunDir(tmp_path / "runs/example_prompts__smollm2_cpu__greedy")
    rows = read_results(run.results())
    assert [r["index"] for r in rows] == list(range(4)) and rows[0]["text"]
    beats = [read_json(p) for p in run.heartbeats.glob("*.json")]
    assert beats and all(b["python"] == "/usr/bin/python3" and b["hf_token_present"] for b in beats)
    (call,) = [json.loads(line) for line in (tmp_path / "apptainer-calls.jsonl").read_text().splitlines()]
    assert call["image"] == str(vllm_image) and "--contain" in call["argv"]
    assert f"{snap.parent.parent / 'blobs'}:{snap.parent.parent / 'blobs'}:ro" in call["binds"]
    check_secret_free(tmp_path, token, hits)


@pytest.mark.slow
def test_the_containers_doc_by_hand_as_written(tmp_path, cpu_model, vllm_image):
    """docs/containers.md's steps 2 and 3 typed in the checkout: the stand-in first on PATH,
    the run's worker inside the sandbox (the OS's python3), every call logged."""
    here = user_checkout(tmp_path)
    log = tmp_path / "apptainer-calls.jsonl"
    fill = {"/tmp/vllm-sandbox": str(vllm_image), "/tmp/apptainer-calls.jsonl": str(log)}
    lines = [
        as_written(
            "export PATH=$PWD/tests/apptainer_standin:$PATH APPTAINER_STANDIN_LOG=/tmp/apptainer-calls.jsonl", fill
        ),
        as_written(
            ".venv/bin/hpc-infer launch data=example_prompts sampling=greedy sampling.max_tokens=8 "
            "cluster.container.image=/tmp/vllm-sandbox 'cluster.container.extra_args=[--contain]'",
            fill,
        ),
    ]
    p = run_line(here, "set -e\n" + "\n".join(lines), timeout=1800)
    assert p.returncode == 0, p.stderr[-5000:]
    run = RunDir(here / "runs/example_prompts__smollm2_cpu__greedy")
    rows = read_results(run.results())
    assert [r["index"] for r in rows] == list(range(8)) and all(r["output_tokens"] > 0 for r in rows)
    beats = [read_json(b) for b in run.heartbeats.glob("*.json")]
    assert beats and all(b["python"] == "/usr/bin/python3" for b in beats)
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls and all(c["image"] == str(vllm_image) and "--contain" in c["argv"] for c in calls)


@pytest.mark.slow
@pytest.mark.slurm
def test_slurm_run_cleanenv_no_home(tmp_path, slurm, cpu_model, vllm_image):
    """A real Slurm job array whose workers run with --cleanenv and no $HOME: the token
    reaches them only as APPTAINERENV_HF_TOKEN through container_exec.sh."""
    token = "hf_CLEANENV_" + os.urandom(8).hex()
    run_launch(
        tmp_path,
        "cluster=slurm_local",
        "cluster.workers=2",
        f"cluster.container.image={vllm_image}",
        "cluster.container.cleanenv=true",
        "cluster.container.extra_args=[--no-home]",
        *TINY,
        env=container_env(tmp_path, HF_TOKEN=token),
    )
    run = RunDir(tmp_path / "runs/example_prompts__smollm2_cpu__greedy")
    rows = read_results(run.results())
    assert [r["index"] for r in rows] == list(range(4)) and len({r["id"] for r in rows}) == 4
    beats = [read_json(p) for p in run.heartbeats.glob("*.json")]
    assert beats and all(b["python"] == "/usr/bin/python3" and b["hf_token_present"] for b in beats)
    calls = [json.loads(line) for line in (tmp_path / "apptainer-calls.jsonl").read_text().splitlines()]
    assert calls and all(c["cleanenv"] and "--no-home" in c["argv"] for c in calls)
    check_secret_free(tmp_path, token, [])


@pytest.mark.slow
@pytest.mark.slurm
def test_slurm_preempted_container_requeues_and_merges_once(tmp_path, slurm, cpu_model, vllm_image):
    """Slurm's preemption warning reaches the worker inside the container (sent to the
    step, and forwarded by the runtime as Apptainer's starter does); the task requeues
    and the requeued task finishes; every record is merged exactly once."""
    args = (
        "cluster=slurm_local",
        "data=example",
        "sampling=greedy",
        "sampling.max_tokens=16",
        "cluster.workers=1",
        "cluster.heartbeat_s=1",
        "cluster.max_chunks_in_flight=1",
        "chunks_per_worker=4",
        f"cluster.container.image={vllm_image}",
    )
    run_launch(tmp_path, *args, "wait=false", env=container_env(tmp_path, **hold_env(tmp_path)))
    preempt_then_finish(RunDir(tmp_path / "runs/example__smollm2_cpu__greedy"), tmp_path, timeout=900)


def test_missing_bind_source_refused_before_planning(tmp_path, cpu_model):
    image = tmp_path / "img"
    image.mkdir()
    p = run_launch(
        tmp_path,
        "cluster=local",
        f"cluster.container.image={image}",
        "cluster.container.binds=[/no/such/scratch:/scratch]",
        *TINY,
        check=False,
        env=container_env(tmp_path),
    )
    assert p.returncode == 2
    assert "cluster.container.binds: /no/such/scratch:/scratch: /no/such/scratch does not exist" in p.stderr
    assert "Nothing was planned or submitted" in p.stderr and not (tmp_path / "runs").exists()


def test_env_path_the_container_cannot_see_refused(tmp_path, cpu_model):
    """A path in cluster.env outside every bind and default mount (the checkout is not
    bound, only the hpc_infer package is; `--contain` drops /tmp and $HOME, so this holds
    wherever the checkout lives) is named with the fix."""
    image = tmp_path / "img"
    image.mkdir()
    hidden = ROOT / "bench"
    p = run_launch(
        tmp_path,
        "cluster=local",
        f"cluster.container.image={image}",
        "cluster.container.extra_args=[--contain]",
        f"+cluster.env.MY_CACHE={hidden}",
        *TINY,
        check=False,
        env=container_env(tmp_path),
        timeout=300,
    )
    assert p.returncode == 2
    assert f"cluster.env.MY_CACHE: {hidden} is not visible inside the container" in p.stderr
    assert f"cluster.container.binds=[{hidden}]" in p.stderr and not (tmp_path / "runs").exists()
    # the fix it names is enough; a path under /tmp ($HOME, a bind) needs none; --contain hides /tmp
    from hpc_infer.cluster.container import check_paths
    from hpc_infer.config import ContainerConfig

    assert (
        check_paths(
            ContainerConfig(image=str(image), binds=[str(hidden)], extra_args=["--contain"]),
            [str(hidden)],
            {"MY_CACHE": str(hidden)},
        )
        == []
    )
    assert check_paths(ContainerConfig(image=str(image)), [], {"MY_CACHE": str(tmp_path)}) == []
    assert check_paths(ContainerConfig(image=str(image), extra_args=["--contain"]), [], {"MY_CACHE": str(tmp_path)})


def test_definition_file_post_steps_run(tmp_path):
    """containers/vllm-hpc_infer.def built as a sandbox: %files copied, %post's pip steps run
    inside the image (with this machine's package registries), %environment applied. The
    result imports the worker, the submitit task and vLLM with no bind and a clean env."""
    base = build_image(tmp_path / "base", extra=("pip",))
    built = build_from_def(ROOT / "containers" / "vllm-hpc_infer.def", base, tmp_path / "built", ROOT)
    p = subprocess.run(
        [
            str(STANDIN / "apptainer"),
            "exec",
            "--cleanenv",
            "--containall",
            str(built),
            "python3",
            "-c",
            "import os, hpc_infer.worker.worker, hpc_infer.cluster.task, submitit, vllm; "
            "print(hpc_infer.worker.worker.__file__, os.environ['HF_HUB_OFFLINE'])",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    path, offline = p.stdout.split()
    assert path.startswith("/usr/local/lib/python3") and offline == "1"


def test_container_that_cannot_start_fails_with_its_error(tmp_path, cpu_model):
    """A worker whose container never starts (here: an image with no /bin/sh) leaves no
    heartbeat and no result: the launch reports the task failed with the runtime's last
    words, instead of waiting on the local controller, which lingers as a zombie."""
    image = tmp_path / "img"
    image.mkdir()
    p = run_launch(
        tmp_path,
        "cluster=local",
        f"cluster.container.image={image}",
        *TINY,
        check=False,
        env=container_env(tmp_path),
        timeout=300,
    )
    assert p.returncode == 2, p.stderr[-2000:]
    assert "FAILED: bwrap: execvp /bin/sh: No such file or directory" in p.stderr


@pytest.mark.slow
def test_doctor_runs_its_probe_inside_the_image(tmp_path, cpu_model, vllm_image):
    """`hpc-infer doctor` with the cluster's image: the probe runs in it (the image's python3
    and its vLLM), the call logged by the stand-in."""
    p = sh(
        tmp_path,
        f"hpc-infer doctor cluster=local cluster.container.image={vllm_image} output_root={tmp_path}/runs",
        env=user_env(container_env(tmp_path)),
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert "(CPU build)" in p.stdout and "model" in p.stdout
    (call,) = [json.loads(line) for line in (tmp_path / "apptainer-calls.jsonl").read_text().splitlines()]
    assert call["image"] == str(vllm_image)
