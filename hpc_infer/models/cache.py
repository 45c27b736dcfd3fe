"""Resolve the model to a local directory on the login node, before any job starts.

Order: explicit path -> the model's known shared paths -> the cluster's catalog ->
the cluster's shared model roots -> the shared HF cache -> one download under a lock. Workers then run with HF_HUB_OFFLINE=1 against that path
and never download (N concurrent first downloads is a known hang).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..config import ClusterConfig, ModelConfig
from ..errors import UserError
from ..rundir.lease import Lock
from ..secrets import Token


def _is_model_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def candidates_in_roots(model: ModelConfig, roots: list[str]) -> list[Path]:
    names = []
    if model.hf_id:
        names += [model.hf_id.split("/")[-1], model.hf_id, model.hf_id.replace("/", "--")]
    names.append(model.name)
    return [Path(root).expanduser() / name for root in roots for name in names]


def resolve_model(model: ModelConfig, cluster: ClusterConfig, token: Token | None, download: bool = True) -> str:
    if model.path:
        path = Path(model.path).expanduser()
        if not _is_model_dir(path):
            raise UserError(
                f"model.path={model.path}: no model there (no config.json); fix the path "
                f"or unset it to use model.hf_id={model.hf_id}"
            )
        return str(path.resolve())
    if model.builtin:
        from .cpu_model import builtin_model

        return str(builtin_model(model.builtin))
    shared = [*map(Path, model.local_paths)]
    if cluster.model_catalog:
        from .cache_admin import lookup

        hit = lookup(cluster.model_catalog, model.name, model.hf_id)
        if hit:
            shared.append(Path(hit))
    for path in [*shared, *candidates_in_roots(model, cluster.model_roots)]:
        if _is_model_dir(path):
            return str(path.resolve())
    assert model.hf_id  # validate() guarantees hf_id, path or builtin
    cache_dir = str(Path(cluster.hf_home).expanduser() / "hub") if cluster.hf_home else None
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(model.hf_id, revision=model.revision, cache_dir=cache_dir, local_files_only=True)
    except Exception:
        pass
    if not download:
        raise UserError(
            f"model {model.hf_id} is not in {', '.join(cluster.model_roots) or 'any model root'} "
            f"or the HF cache; stage it with `hpc-infer cache stage` or set model.path"
        )
    return _download_once(model, cache_dir, token)


def _download_once(model: ModelConfig, cache_dir: str | None, token: Token | None) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    lock_dir = Path(cache_dir or Path.home() / ".cache" / "huggingface" / "hub").expanduser()
    lock_dir.mkdir(parents=True, exist_ok=True)

    # a second launcher waits, then finds the files; O_EXCL, never follows a link, needs no flock
    def waiting() -> None:
        print(
            f"[hpc_infer] another launch is downloading {model.hf_id}; waiting for it (one download, not one each)",
            file=sys.stderr,
            flush=True,
        )

    with Lock(lock_dir / f".hpc_infer-{model.hf_id.replace('/', '--')}.lock", lease_s=300, on_wait=waiting):
        try:
            return snapshot_download(
                model.hf_id, revision=model.revision, cache_dir=cache_dir, token=token.value if token else None
            )
        except GatedRepoError:
            hint = "then set HF_TOKEN" if token is None else f"the token from {token.source} has no access yet"
            raise UserError(
                f"Access to model {model.hf_id} is restricted: request access on its Hugging Face page, {hint}"
            ) from None
        except RepositoryNotFoundError:
            raise UserError(
                f"model {model.hf_id} does not exist on the Hugging Face hub (or is private: set HF_TOKEN); "
                f"check model.hf_id"
            ) from None
        except Exception as e:
            if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
                raise UserError(
                    f"cannot download {model.hf_id}: HF_HUB_OFFLINE=1 is set in your environment; unset it "
                    f"for this launch (workers stay offline anyway), or stage the model and set model.path"
                ) from None
            raise UserError(
                f"cannot download {model.hf_id} ({type(e).__name__}); on a machine without network, "
                f"stage the model into a shared root (cluster.model_roots) or set model.path"
            ) from None
