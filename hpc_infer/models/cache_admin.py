"""Admin side of the shared model cache: stage, list, verify, catalog.

    hpc-infer cache stage SOURCE --root /shared/models [--name NAME] [--hf-id ID]
    hpc-infer cache list --root /shared/models
    hpc-infer cache verify --root /shared/models [NAME ...]
    hpc-infer cache catalog --root /shared/models     (writes ROOT/catalog.json)

Staging copies into a hidden directory beside the target, verifies it, makes it
group-readable with setgid directories, then renames it into place: users never see a
half-copied model. A per-model lock makes concurrent stagers copy once; the others
wait and find the finished copy. A cluster config points at the catalog
(`cluster.model_catalog`) so users write `model=llama31_8b` and get the shared copy.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import shutil
import sys
import stat
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import UserError
from ..rundir import write_json
from ..rundir.fsio import fd_path
from ..rundir.lease import Lock

from .load_format import META  # noqa: E402  (one name for the file every copy carries)


@dataclass
class Entry:
    name: str
    path: str
    hf_id: str | None
    revision: str | None
    size_bytes: int
    mode: str  # e.g. drwxr-sr-x
    group_readable: bool
    world_readable: bool
    problem: str | None = None  # why the cache's rule refused it (left out of the catalog)


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _share(path: Path, private: set[str]) -> None:
    """Directories rwxr-sr-x (setgid keeps the group), files rw-r--r--, except files whose
    source was not readable by others (`private`, relative paths): staging never widens those."""
    for d, _, files in os.walk(path):
        os.chmod(d, 0o2755)
        for f in files:
            full = os.path.join(d, f)
            os.chmod(full, 0o600 if os.path.relpath(full, path) in private else 0o644)


# Files the cache policy publishes (0644) whatever their source mode: what a model directory holds.
MODEL_FILE = re.compile(
    r"[\w.-]+\.(safetensors|gguf|bin|pt|pth|msgpack|h5|onnx|tiktoken|model|jinja)|[\w.-]*config\.json"
    r"|[\w.-]+\.index\.json|tokenizer[\w.-]*\.json|special_tokens_map\.json|vocab\.(json|txt)|merges\.txt"
    r"|added_tokens\.json|chat_template\.json|README\.md|LICEN[CS]E[\w.-]*|USE_POLICY\.md|NOTICE|\.gitattributes"
)
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,199}")


def check_names(name: str | None, hf_id: str | None) -> None:
    """Before touching the file system: a cache name is one plain path component, an HF id is
    org/name of plain components (no '..', no absolute paths), so nothing lands outside the root."""
    if name is not None and (not PLAIN_NAME.fullmatch(name) or name in (".", "..")):
        raise UserError(
            f"--name {name!r}: give one plain name (letters, digits, ._+-; no '/', no leading '.'), "
            f"e.g. --name Llama-3.1-8B"
        )
    if hf_id is not None:
        parts = hf_id.split("/")
        if len(parts) != 2 or not all(PLAIN_NAME.fullmatch(p) and p not in (".", "..") for p in parts):
            raise UserError(f"--hf-id {hf_id!r}: give a Hugging Face id as org/name, e.g. meta-llama/Llama-3.1-8B")


def _hidden_from_others(target: Path, base: Path) -> str | None:
    """Why others could not read `target` at the source, or None: the file itself is not
    world-readable, or a folder on the way from `base` down to it is not world-searchable
    (a 0700 subfolder, a link into a hidden 0700 folder). A hard link has its target's mode."""
    st = os.stat(target)
    if not st.st_mode & stat.S_IROTH:
        return f"mode {stat.filemode(st.st_mode)}"
    d = target.parent
    while True:
        if not os.stat(d).st_mode & stat.S_IXOTH:
            return f"inside {d} (mode {stat.filemode(os.stat(d).st_mode)})"
        if d == base or d == d.parent or not d.is_relative_to(base):
            return None
        d = d.parent


def _copy_model(src: Path, dst: Path, base: Path) -> tuple[set[str], list[str]]:
    """Copy a model directory without following links out of `base`: a symlink whose target
    lies outside is refused (never read), one inside is copied as the file it points to.
    Staging never widens what the source protected: a file others could not read there
    (its mode, or a folder above it up to `base`) is published private (0600) if it is not
    part of a model, and refuses the stage if it is (a model others cannot read is no
    shared model: make it readable at the source if it is meant to be shared).
    Returns (relative paths kept private, a line for each)."""
    base = base.resolve()
    private: set[str] = set()
    said: list[str] = []
    problems: list[str] = []
    for d, dirs, files in os.walk(src, followlinks=False):
        rel_d = os.path.relpath(d, src)
        os.makedirs(dst / rel_d, exist_ok=True)
        for name in list(dirs) + files:
            p = Path(d) / name
            if name.startswith(".") and name != ".gitattributes":
                dirs[:] = [x for x in dirs if x != name]
                continue  # .cache/, .git/, editor files: not part of a model
            target = p
            if p.is_symlink():
                target = p.resolve()
                if not target.is_relative_to(base) or not target.is_file():
                    problems.append(
                        f"{p} -> {os.readlink(p)}: a link out of {base} (or to a folder); "
                        f"refused, not read. Replace it with the file itself"
                    )
                    continue
            elif p.is_dir():
                continue
            elif not p.is_file():
                problems.append(f"{p}: not a regular file (a device, FIFO or socket)")
                continue
            rel = os.path.join(rel_d, name) if rel_d != "." else name
            hidden = _hidden_from_others(target, base)
            if hidden and MODEL_FILE.fullmatch(name):
                problems.append(
                    f"{p}: others cannot read it at the source ({hidden}); staging would publish it "
                    f"to everyone. Refused: make it readable at the source (chmod o+r, o+x on its "
                    f"folders) if it is meant to be shared, or remove it"
                )
                continue
            if hidden:
                private.add(rel)  # not a model file and private at the source: stays private
                said.append(f"{rel}: kept private (0600): others cannot read it at the source ({hidden})")
                continue  # copied below, after the checks: nothing of a refused stage is read
            shutil.copyfile(target, dst / rel, follow_symlinks=True)
    if problems:
        raise UserError("source not staged:\n  " + "\n  ".join(problems))
    for rel in private:
        fd = os.open(dst / rel, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never briefly wider
        with os.fdopen(fd, "wb") as out, open((src / rel).resolve(), "rb") as f:
            shutil.copyfileobj(f, out)
    return private, said


def verify_dir(path: Path) -> list[str]:
    """Problems found in a model directory the admin named as a source, or a copy being
    staged (empty list: complete and readable). By path: a source may be a Hub snapshot,
    whose files are links into its blob store; the copy is made without them."""
    problems = []
    config = path / "config.json"
    try:
        json.loads(config.read_text())
    except (OSError, ValueError) as e:
        problems.append(f"{config}: missing or not JSON ({type(e).__name__})")
    index = path / "model.safetensors.index.json"
    shards = sorted(path.glob("*.safetensors"))
    if index.exists():
        try:
            wanted = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError) as e:
            problems.append(f"{index}: unreadable ({type(e).__name__})")
            wanted = set()
        for name in sorted(wanted - {p.name for p in shards}):
            problems.append(f"{path / name}: listed in the index but missing")
    if not shards and not list(path.glob("*.bin")) and not list(path.glob("*.gguf")):
        problems.append(f"{path}: no weight files (*.safetensors, *.bin, *.gguf)")
    for shard in shards:
        try:
            fd = os.open(shard, os.O_RDONLY)
        except OSError as e:
            problems.append(f"{shard}: unreadable ({e.strerror})")
            continue
        try:
            problems += [p.replace(fd_path(fd), str(shard)) for p in _check_safetensors(fd)]
        finally:
            os.close(fd)
    return problems


def verify_model(fs, name: str) -> list[str]:
    """Problems of the model folder `name` in the cache root's handle `fs` (`cache verify`):
    every file opened relative to it, never through a link; a file the root's rule
    (rundir/trust.py) refuses is a problem too, named."""
    from ..errors import DamagedFile

    at = (lambda n: f"{name}/{n}") if name else (lambda n: n)
    problems = []
    try:
        json.loads(fs.read(at("config.json")))
    except (OSError, ValueError, UserError) as e:
        problems.append(f"{fs.where(at('config.json'))}: missing, refused or not JSON ({_why(e)})")
    try:
        names = fs.listdir(name)
    except (OSError, UserError) as e:
        return problems + [f"{fs.where(name)}: cannot list it ({_why(e)})"]
    shards = sorted(n for n in names if n.endswith(".safetensors"))
    if "model.safetensors.index.json" in names:
        try:
            wanted = set(json.loads(fs.read(at("model.safetensors.index.json")))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, UserError) as e:
            problems.append(f"{fs.where(at('model.safetensors.index.json'))}: unreadable ({_why(e)})")
            wanted = set()
        for missing in sorted(wanted - set(shards)):
            problems.append(f"{fs.where(at(missing))}: listed in the index but missing")
    if not shards and not any(n.endswith((".bin", ".gguf")) for n in names):
        problems.append(f"{fs.where(name)}: no weight files (*.safetensors, *.bin, *.gguf)")
    for shard in shards:
        try:
            fd = fs.open_file(at(shard))
        except (OSError, DamagedFile, UserError) as e:
            problems.append(f"{fs.where(at(shard))}: refused or unreadable ({_why(e)})")
            continue
        try:
            problems += [p.replace(fd_path(fd), fs.where(at(shard))) for p in _check_safetensors(fd)]
        finally:
            os.close(fd)
    return problems


def _why(e: Exception) -> str:
    return getattr(e, "strerror", None) or str(e).splitlines()[0][:200] or type(e).__name__


def _check_safetensors(fd: int) -> list[str]:
    """Header parses and every tensor's bytes lie inside the file (catches truncation); the
    file is an open descriptor (read through /proc/self/fd: safetensors takes a path)."""
    from safetensors import safe_open

    path = fd_path(fd)
    try:
        with safe_open(path, framework="numpy") as f:
            keys = list(f.keys())
            if keys:
                f.get_slice(keys[-1])
        header_len = int.from_bytes(os.pread(fd, 8, 0), "little")
        header = json.loads(os.pread(fd, header_len, 8))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except Exception as e:
        return [f"{path}: not a readable safetensors file ({type(e).__name__}: {e})"]
    size = os.fstat(fd).st_size
    if size < 8 + header_len + end:
        return [f"{path}: truncated ({size} bytes, header says {8 + header_len + end})"]
    return []


def stage(
    source: str, root: str, name: str | None = None, hf_id: str | None = None, revision: str | None = None
) -> Path:
    """Copy a model into the shared root once, atomically. Returns the final path."""
    check_names(name, hf_id)
    root_p = Path(root).expanduser()
    src = Path(source).expanduser()
    base = src  # symlinks must stay inside this
    if not src.is_dir():
        if "/" in source and not src.exists():
            from huggingface_hub import snapshot_download

            try:
                check_names(None, source)
                src = Path(snapshot_download(source, revision=revision))
            except UserError:
                raise
            except Exception as e:
                raise UserError(
                    f"cannot fetch {source} ({type(e).__name__}); stage from a local directory instead"
                ) from None
            hf_id = hf_id or source
            base = src.parent.parent  # the hub cache's models--org--name: snapshot links point to its blobs/
        else:
            raise UserError(f"{source}: not a directory (give a model directory or a Hugging Face id)")
    name = name or (hf_id or src.name).split("/")[-1]
    check_names(name, hf_id)
    target = root_p / name
    root_p.mkdir(parents=True, exist_ok=True)
    # The root, pinned: the copy is made, checked and published through this descriptor
    # (/proc/self/fd/N/...), so a root exchanged by whoever can rename entries above it never
    # receives the copy, and the rename that publishes it stays inside the folder checked.
    try:
        root_fd = os.open(root_p.resolve(), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as e:
        raise UserError(f"hpc-infer cache stage --root: cannot open {root_p} ({e.strerror})") from None
    try:
        return _stage_into(root_fd, root_p, target, src, base, name, hf_id, revision, source)
    finally:
        os.close(root_fd)


def _stage_into(root_fd, root_p, target, src, base, name, hf_id, revision, source) -> Path:
    pinned = Path(fd_path(root_fd))
    if os.getuid() == 0:  # root writes what a link planted in a root others can write would point it at
        from ..rundir import trust

        trust.judge_fd(
            root_fd,
            str(root_p),
            "hpc-infer cache stage --root",
            trust.OWN,
            fix=f"as root, stage only into a root nobody else can write (`chmod go-w {root_p}`)",
        )

    def waiting() -> None:
        print(
            f"[hpc_infer] another stage of {name} into {root_p} is running; waiting for it", file=sys.stderr, flush=True
        )

    with Lock(root_p / f".{name}.lock", lease_s=300, on_wait=waiting):  # O_EXCL, never follows a link, no flock
        if (pinned / name).exists():
            return target  # another stager finished it while we waited
        problems = verify_dir(src)
        if problems:
            raise UserError("source is incomplete, not staged:\n  " + "\n  ".join(problems))
        tmp = pinned / f".{name}.staging-{uuid.uuid4().hex[:8]}"
        try:
            private, said = _copy_model(src, tmp, base)
            write_json(
                tmp / META,
                {
                    "name": name,
                    "hf_id": hf_id,
                    "revision": revision,
                    "source": str(src),
                    "staged_at": time.time(),
                    "staged_by": getpass.getuser(),
                },
            )
            problems = verify_dir(tmp)
            if problems:
                raise UserError("copy failed verification, not staged:\n  " + "\n  ".join(problems))
            _share(tmp, private)
            os.rename(tmp.name, name, src_dir_fd=root_fd, dst_dir_fd=root_fd)
            for line in said:
                print(f"[hpc_infer] {line}", file=sys.stderr)
        except OSError as e:  # a rename race, a full disk, a file gone mid-copy: one clear line
            raise UserError(
                f"staging {source} into {root_p} failed: {e.strerror or e} "
                f"({e.filename or ''}); nothing was published, run the same command again"
            ) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def shard(source: str, root: str, tp: int, pp: int = 1, name: str | None = None, dtype: str = "auto") -> Path:
    """A sharded-state copy of a model for TP x PP (model.load_format=sharded_state), written
    by vLLM itself into a staging directory and published into the root by one rename, like
    `stage`. Runs an engine of TP x PP ranks: on a GPU cluster, inside an allocation with
    that many GPUs (`srun --gres=gpu:TP hpc-infer cache shard ...`)."""
    from .load_format import check_load_format, incomplete_copy, write_sharded_state

    root_p = Path(root).expanduser()
    src = Path(source).expanduser()
    if not src.is_dir():
        src = root_p / source
    if not (src / "config.json").is_file():
        raise UserError(f"{source}: not a model directory (no config.json), here or under {root_p}")
    name = name or f"{src.name}-tp{tp}" + (f"-pp{pp}" if pp > 1 else "")
    check_names(name, None)
    target = root_p / name
    if target.exists():
        raise UserError(f"{target} exists; give another --name or remove it first")
    root_p.mkdir(parents=True, exist_ok=True)
    tmp = root_p / f".{name}.staging-{uuid.uuid4().hex[:8]}"
    try:
        written = write_sharded_state(str(src), tmp, tp, pp, dtype)
        write_json(
            tmp / META,
            {
                "name": name,
                "source": str(src),
                "load_format": "sharded_state",
                "tensor_parallel_size": tp,
                "pipeline_parallel_size": pp,
                "dtype": written,
                "staged_at": time.time(),
                "staged_by": getpass.getuser(),
            },
        )
        problems = check_load_format("sharded_state", tmp, tp, pp, sys.executable, written)
        lost = incomplete_copy(tmp, src)
        if lost:
            problems.append(
                lost
                + (
                    " (vLLM's CPU build keeps them only when the copy is written by one process: --tp 1 --pp 1)"
                    if tp * pp > 1
                    else ""
                )
            )
        if problems:
            raise UserError("the sharded copy is incomplete, not published:\n  " + "\n  ".join(problems))
        _share(tmp, set())
        tmp.rename(target)
    except OSError as e:
        raise UserError(
            f"sharding {source} into {root_p} failed: {e.strerror or e} ({e.filename or ''}); nothing was published"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def open_root(root: str):
    """The cache root, opened once and judged (rundir/trust.py): nobody but its owner may
    write it; every model folder and file is then read relative to it, never by a path
    resolved again and never through a link."""
    from ..rundir import trust

    return trust.open_dir(Path(root).expanduser(), "cache root (--root)", trust.SHARED)


def model_names(fs) -> list[str]:
    """The model folders under the root: folders (never a link), not hidden."""
    out = []
    for n in sorted(fs.listdir("")):
        st = fs.stat(n)
        if not n.startswith(".") and st is not None and stat.S_ISDIR(st.mode):
            out.append(n)
    return out


def model_entry(fs, root_uid: int, name: str) -> Entry:
    """One model folder's line; `problem` says why the rule refused it: a folder, file or
    metadata that someone other than the root's owner (or root) owns or could write."""
    st = fs.stat(name)
    files: list = []
    problem = None
    meta: dict = {}
    try:
        if st.uid not in (root_uid, 0):
            raise UserError(f"owned by uid {st.uid}, not by the cache root's owner")
        todo = [name]
        while todo:
            folder = todo.pop()
            for n in fs.listdir(folder):
                fst = fs.stat(f"{folder}/{n}")
                if fst is None:
                    continue
                if stat.S_ISDIR(fst.mode):
                    todo.append(f"{folder}/{n}")
                elif stat.S_ISREG(fst.mode):
                    files.append(fst)
                    if fst.uid not in (root_uid, 0):
                        raise UserError(f"{folder}/{n}: owned by uid {fst.uid}, not by the cache root's owner")
                else:
                    raise UserError(f"{folder}/{n}: a link (or not a file) inside a model folder")
        if fs.stat(f"{name}/{META}") is not None:
            value = json.loads(fs.read(f"{name}/{META}"))  # judged as it is opened
            meta = value if isinstance(value, dict) else {}
            if not all(isinstance(meta.get(k), (str, type(None))) for k in ("hf_id", "revision")):
                raise ValueError(f"{META}: hf_id and revision must be strings")
    except (OSError, ValueError, UserError) as e:
        problem = _why(e)
    return Entry(
        name=name,
        path=fs.where(name),
        hf_id=None if problem else meta.get("hf_id"),
        revision=None if problem else meta.get("revision"),
        size_bytes=sum(f.size for f in files),
        mode=stat.filemode(st.mode),
        group_readable=bool(files) and all(f.mode & stat.S_IRGRP for f in files),
        world_readable=bool(files) and all(f.mode & stat.S_IROTH for f in files),
        problem=problem,
    )


def list_models(root: str) -> list[Entry]:
    fs = open_root(root)
    try:
        root_uid = fs.stat().uid
        return [model_entry(fs, root_uid, n) for n in model_names(fs)]
    finally:
        fs.close()


def write_catalog(root: str) -> Path:
    """ROOT/catalog.json (written through the root's handle, never through a link): every
    model the rule accepts; a refused one is left out and named on stderr."""
    fs = open_root(root)
    try:
        root_uid = fs.stat().uid
        entries = [model_entry(fs, root_uid, n) for n in model_names(fs)]
        for e in entries:
            if e.problem:
                print(f"[hpc_infer] {e.path}: left out of the catalog ({e.problem})", file=sys.stderr)
        catalog = {
            "models": {
                e.name: {"path": e.path, "hf_id": e.hf_id, "revision": e.revision} for e in entries if not e.problem
            }
        }
        fs.replace("catalog.json", (json.dumps(catalog, indent=1) + "\n").encode())
        return Path(fs.where("catalog.json"))
    finally:
        fs.close()


def lookup(catalog_path: str, name: str, hf_id: str | None) -> str | None:
    """The shared path of a model by config name or HF id, from a catalog file."""
    try:
        models = json.loads(Path(catalog_path).expanduser().read_text())["models"]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(
            f"cluster.model_catalog={catalog_path}: unreadable ({type(e).__name__}); "
            f"regenerate it with `hpc-infer cache catalog`"
        ) from None
    for key, entry in models.items():
        if key == name or (hf_id and (entry.get("hf_id") == hf_id or key == hf_id.split("/")[-1])):
            return entry["path"]
    return None


def as_dicts(entries: list[Entry]) -> list[dict]:
    return [asdict(e) for e in entries]
