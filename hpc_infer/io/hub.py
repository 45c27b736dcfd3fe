"""data.path=hf://datasets/ORG/NAME[@rev]: the files of one split of a Hub dataset repo,
fetched once on the login node into the shared Hugging Face cache with huggingface_hub.

Which files: the repo card's `configs:` (each subset's data_files per split, as the Hub's
viewer and `datasets` read them); else the Hub's naming convention (`data/test-0000…`,
`test.jsonl`, a folder per split); else, for a repo with no data files of its own (a script
set), the parquet the Hub converted it to (`refs/convert/parquet`: `<subset>/<split>/NNNN.parquet`).
The revision asked for is resolved to its commit first, and everything is read at that
commit: the run's fingerprint and summary name it. With HF_HUB_OFFLINE=1 the copy already
in the cache is used, or the refusal says how to get one.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from ..config import DataConfig
from ..config.validate import hub_address
from ..errors import UserError
from .sources import SHARD_FORMATS, Source, choose_split, one_format, pick, split_of

CONVERTED = "refs/convert/parquet"
METADATA = {"dataset_info.json", "dataset_infos.json", "state.json", "dataset_dict.json"}


def resolve_hub(cfg: DataConfig, hf_home: Optional[str], token_file: Optional[str]) -> Source:
    from ..secrets import find_token

    repo, rev = hub_address(cfg.path)
    cache_dir = str(Path(hf_home).expanduser() / "hub") if hf_home else None
    token = find_token(token_file)
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return _cached(cfg, repo, rev, cache_dir)
    with _hub_errors(cfg.path, repo, rev, token):
        found = _choose_online(cfg, repo, rev, token, cache_dir)
        if found is None and rev is None:  # no data files of its own: the Hub's parquet conversion
            found = _choose_online(cfg, repo, CONVERTED, token, cache_dir)
        if found is None:
            raise UserError(
                f"data.path={cfg.path}: the repo has no parquet, jsonl or arrow files at "
                f"{rev or 'main'}{'' if rev else ' (nor a converted parquet branch)'}; point data.path at a "
                f"dataset repo with data files, or at @{CONVERTED}"
            )
        sha, chosen, subset, split, asked = found
        from huggingface_hub import snapshot_download

        # by the revision's name (so the cache records it for HF_HUB_OFFLINE=1 later), then
        # checked to be the commit the files were chosen at
        folder = Path(
            snapshot_download(
                repo,
                repo_type="dataset",
                revision=found[4],
                allow_patterns=chosen,
                cache_dir=cache_dir,
                token=token.value if token else False,
            )
        )
        if folder.name != sha:
            raise UserError(
                f"data.path={cfg.path}: the repo changed while it was read ({sha[:12]} then {folder.name[:12]}); "
                f"launch again, or pin a commit with @<commit>"
            )
    return _source(repo, asked, sha, chosen, subset, split, folder, cfg)


def _choose_online(cfg: DataConfig, repo: str, rev: Optional[str], token, cache_dir: Optional[str]) -> tuple | None:
    """(commit, files, subset, split) at the revision, or None when it holds no data files."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.hf_api import RepoFile

    api, tok = HfApi(), (token.value if token else False)
    sha = api.dataset_info(repo, revision=rev, token=tok).sha
    files = [
        f.path
        for f in api.list_repo_tree(repo, recursive=True, revision=sha, repo_type="dataset", token=tok)
        if isinstance(f, RepoFile)
    ]
    card = None
    if "README.md" in files and rev != CONVERTED:
        card = Path(
            hf_hub_download(repo, "README.md", repo_type="dataset", revision=sha, cache_dir=cache_dir, token=tok)
        ).read_text(encoding="utf-8", errors="replace")
    chosen = choose(files, card, rev == CONVERTED, cfg, f"hf://datasets/{repo}@{rev or 'main'}")
    return None if chosen is None else (sha, *chosen, rev or "main")


def _cached(cfg: DataConfig, repo: str, rev: Optional[str], cache_dir: Optional[str]) -> Source:
    """HF_HUB_OFFLINE=1: the files an earlier launch fetched into the cache, chosen the same way."""
    from huggingface_hub import scan_cache_dir

    asked = rev or "main"
    folder = None
    try:
        for cached in scan_cache_dir(cache_dir).repos:
            if cached.repo_type == "dataset" and cached.repo_id == repo:
                folder = next(
                    (r.snapshot_path for r in cached.revisions if asked in r.refs or r.commit_hash == asked), None
                )
    except Exception:  # no cache folder at all
        folder = None
    if folder is None:
        raise UserError(
            f"data.path={cfg.path}: HF_HUB_OFFLINE=1 is set and the cache "
            f"({cache_dir or 'the default Hugging Face cache'}) holds no copy of it at {asked}; launch once where "
            f"the Hub is reachable (the set is fetched into cluster.hf_home for everyone), or unset HF_HUB_OFFLINE"
        )
    folder = Path(folder)
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    card = (folder / "README.md").read_text(encoding="utf-8", errors="replace") if "README.md" in files else None
    try:
        chosen = choose(files, card, rev == CONVERTED, cfg, f"{cfg.path} (cached copy in {folder})")
    except UserError as e:
        raise UserError(
            f"{e} (HF_HUB_OFFLINE=1: only what an earlier launch fetched is in the cache; unset it to fetch more)"
        ) from None
    if chosen is None:
        raise UserError(f"data.path={cfg.path}: the cached copy in {folder} holds no data files; unset HF_HUB_OFFLINE")
    return _source(repo, rev, folder.name, *chosen, folder, cfg)


def _source(repo, rev, sha, chosen, subset, split, folder: Path, cfg: DataConfig) -> Source:
    paths = tuple(folder / f for f in chosen)
    missing = [f for f, p in zip(chosen, paths) if not p.is_file()]
    if missing:
        raise UserError(f"data.path={cfg.path}: {missing[0]} is missing from the downloaded copy in {folder}")
    fmt = one_format(paths, cfg, f"data.path={cfg.path} split {split}")
    origin = {
        "hub": repo,
        "revision": sha,
        "asked": rev or "main",
        "subset": subset,
        "split": split,
        "files": list(chosen),
        "root": str(folder),
    }
    return Source(paths, fmt, f"hf://datasets/{repo}@{sha}", origin)


def choose(files: list[str], card: Optional[str], converted: bool, cfg: DataConfig, where: str):
    """(files, subset, split) of one split of the repo, in read order; None: no data files."""
    data = sorted(
        f
        for f in files
        if Path(f).suffix.lower() in SHARD_FORMATS
        and Path(f).name not in METADATA
        and not any(p.startswith(".") for p in f.split("/"))
    )
    if not data:
        return None
    configs = card_configs(card) if card else {}
    if converted:  # <subset>/<split>/NNNN.parquet (older: <subset>/partial-<split>/...)
        subsets = sorted({f.split("/")[0] for f in data if f.count("/") >= 2})
        subset = pick(subsets, cfg.subset, "data.subset", f"subsets of {where}")
        splits = sorted({f.split("/")[1].removeprefix("partial-") for f in data if f.startswith(subset + "/")})
        split = pick(splits, cfg.split, "data.split", f"splits of {where} {subset}")
        chosen = [f for f in data if f.split("/")[:2] in ([subset, split], [subset, "partial-" + split])]
        return chosen, subset, split
    if configs:
        default = next((n for n, c in configs.items() if c["default"]), None)
        subset = pick(
            sorted(configs), cfg.subset or (default if len(configs) > 1 else None), "data.subset", f"subsets of {where}"
        )
        splits = configs[subset]["splits"]
        split = pick(sorted(splits), cfg.split, "data.split", f"splits of {where} {subset}")
        chosen = [f for f in data if any(glob_match(f, p) for p in splits[split])]
        if not chosen:
            raise UserError(
                f"{where}: the repo card's data_files for {subset}/{split} ({', '.join(splits[split])}) match no file"
            )
        return chosen, subset, split
    if cfg.subset is not None:
        tops = sorted({f.split("/")[0] for f in data if "/" in f})
        if cfg.subset not in tops:
            raise UserError(
                f"data.subset={cfg.subset}: {where} defines no subsets (no configs in its card; folders: "
                f"{', '.join(tops) or 'none'}); remove data.subset or name one of the folders"
            )
        data = [f for f in data if f.startswith(cfg.subset + "/")]
    chosen = choose_split(data, cfg.split, where)
    return chosen, cfg.subset, cfg.split or split_of(chosen[0]) or None


def card_configs(card: str) -> dict[str, dict]:
    """The `configs:` of a repo card's YAML header: name -> {splits: {split: [patterns]}, default}."""
    import yaml

    m = re.match(r"---\s*\n(.*?)\n---\s*(\n|$)", card, re.S)
    if not m:
        return {}
    try:
        header = yaml.safe_load(m.group(1)) or {}
    except yaml.YAMLError:
        return {}
    out: dict[str, dict] = {}
    for c in header.get("configs") or [] if isinstance(header, dict) else []:
        if not isinstance(c, dict) or "data_files" not in c:
            continue
        name = str(c.get("config_name", "default"))
        files = c["data_files"]
        splits: dict[str, list[str]] = {}
        if isinstance(files, (str, list)) and not (isinstance(files, list) and files and isinstance(files[0], dict)):
            splits["train"] = [files] if isinstance(files, str) else [str(p) for p in files]
        elif isinstance(files, dict):
            splits = {str(k): [v] if isinstance(v, str) else [str(p) for p in v] for k, v in files.items()}
        else:
            for entry in files:
                if isinstance(entry, dict) and "split" in entry and "path" in entry:
                    p = entry["path"]
                    splits[str(entry["split"])] = [p] if isinstance(p, str) else [str(x) for x in p]
        if splits:
            out[name] = {"splits": splits, "default": bool(c.get("default"))}
    return out


def glob_match(path: str, pattern: str) -> bool:
    """The Hub's data_files patterns: `*` within one folder, `**` across folders."""
    pattern = pattern.removeprefix("./")
    rx = ""
    for token in re.split(r"(\*\*/?|\*|\?)", pattern):
        if token in ("**", "**/"):
            rx += "(?:.*/)?" if token == "**/" else ".*"
        elif token == "*":
            rx += "[^/]*"
        elif token == "?":
            rx += "[^/]"
        else:
            rx += re.escape(token)
    return re.fullmatch(rx, path) is not None


@contextmanager
def _hub_errors(path: str, repo: str, rev: Optional[str], token) -> Iterator[None]:
    """The Hub's refusals as the fix the user needs; never the token."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        yield
    except GatedRepoError:
        hint = "then set HF_TOKEN" if token is None else f"the token from {token.source} has no access to it yet"
        raise UserError(
            f"data.path={path}: the dataset is gated: accept its terms on https://huggingface.co/datasets/{repo} "
            f"while logged in, {hint}. Nothing was submitted"
        ) from None
    except RepositoryNotFoundError:
        raise UserError(
            f"data.path={path}: no dataset {repo} on the Hub (or it is private: set HF_TOKEN to a token that "
            f"can read it); check the name"
        ) from None
    except RevisionNotFoundError:
        raise UserError(
            f"data.path={path}: the repo has no revision {rev}; give a branch, tag or commit after @"
        ) from None
    except UserError:
        raise
    except Exception as e:
        raise UserError(
            f"data.path={path}: cannot read it from the Hub ({type(e).__name__}); where the Hub cannot be "
            f"reached, fetch the set once on a machine that can into cluster.hf_home, then launch with "
            f"HF_HUB_OFFLINE=1"
        ) from None
