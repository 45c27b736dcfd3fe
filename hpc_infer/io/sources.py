"""Where data.path's records are, as local files in read order: one file, a folder of
parquet or jsonl shards, a folder written by `datasets.save_to_disk` (Arrow stream files
plus state.json), or a Hub dataset repo (`hf://datasets/ORG/NAME[@rev]`, io/hub.py).

Resolved once per process on the login node (memoized: the planner, the duplicate-id
re-read and worker.json ask again and get the same files, so a Hub set is fetched once).
Jobs never read data.path: the planner copies every record into the run's chunk files.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..config import DataConfig
from ..config.validate import SHARD_FORMATS
from ..errors import UserError

HUB_PREFIX = "hf://datasets/"
# the names the Hub's data-files convention knows as splits, for telling the splits of a layout apart
SPLIT_NAMES = ("train", "test", "validation", "valid", "val", "dev", "eval")


@dataclass(frozen=True)
class Source:
    """data.path resolved: the files to read, in order, and what messages and the run's
    summary say they are."""

    files: tuple[Path, ...]
    format: str  # jsonl | openai_batch | txt | csv | parquet | arrow
    label: str  # what messages name: the path, or hf://datasets/ORG/NAME@<commit>
    origin: dict = field(default_factory=dict)  # {hub, revision, subset, split, files} or {folder, split, files}

    def name_of(self, file: Path) -> str:
        """How a message names one of the files: the label, plus the shard when there are several."""
        if len(self.files) == 1 and not self.origin.get("hub"):
            return self.label
        base = Path(self.origin.get("root", file.parent))
        try:
            rel = file.relative_to(base)
        except ValueError:
            rel = Path(file.name)
        return f"{self.label} ({rel})"


_RESOLVED: dict[tuple, Source] = {}


def is_hub(path: str) -> bool:
    return str(path).startswith("hf://")


def resolve(cfg: DataConfig, hf_home: Optional[str] = None, token_file: Optional[str] = None) -> Source:
    """data.path (+ data.split, data.subset, data.format) -> the files to read."""
    key = (cfg.path, cfg.split, cfg.subset, cfg.format)
    if key not in _RESOLVED:
        if is_hub(cfg.path):
            from .hub import resolve_hub

            _RESOLVED[key] = resolve_hub(cfg, hf_home, token_file)
        else:
            _RESOLVED[key] = resolve_local(cfg)
    return _RESOLVED[key]


def resolve_local(cfg: DataConfig) -> Source:
    from .data import detect_format

    path = Path(cfg.path).expanduser()
    if not path.is_dir():
        if cfg.split or cfg.subset:
            which = "data.split" if cfg.split else "data.subset"
            raise UserError(
                f"{which}={cfg.split or cfg.subset}: {path} is one file, which has no splits or subsets; remove "
                f"{which}, or point data.path at a folder of shards or a hf://datasets/ORG/NAME repo"
            )
        return Source((path,), detect_format(path, cfg.format), str(path))
    if cfg.subset:
        raise UserError(
            f"data.subset={cfg.subset}: subsets (configs) belong to Hub repos; for a folder, point data.path "
            f"at the subset's own folder ({path}/{cfg.subset}?) and remove data.subset"
        )
    if (path / "dataset_dict.json").is_file():  # datasets.DatasetDict.save_to_disk: one folder per split
        splits = _json(path / "dataset_dict.json").get("splits")
        if not isinstance(splits, list) or not all(isinstance(s, str) for s in splits):
            raise UserError(f"{path}/dataset_dict.json: no list of splits; is this a save_to_disk folder?")
        split = pick(splits, cfg.split, "data.split", f"splits of {path}")
        return _saved(path / split, cfg, split)
    if (path / "state.json").is_file():
        return _saved(path, cfg, cfg.split)
    from ..config.validate import data_files_in

    shards = data_files_in(path)
    if not shards:
        raise UserError(
            f"data.path={cfg.path}: a folder with no .parquet, .jsonl or .arrow files (nor a save_to_disk "
            f"state.json); point data.path at the prompt file or at a folder of shards"
        )
    rel = [str(p.relative_to(path)) for p in shards]
    chosen = choose_split(rel, cfg.split, f"{path}")
    files_ = tuple(path / r for r in chosen)
    fmt = one_format(files_, cfg, str(path))
    return Source(files_, fmt, str(path), {"folder": str(path), "root": str(path), "split": cfg.split, "files": chosen})


def _saved(folder: Path, cfg: DataConfig, split: Optional[str]) -> Source:
    """A folder written by Dataset.save_to_disk: state.json lists its Arrow files in order."""
    state = _json(folder / "state.json")
    names = [d.get("filename") for d in state.get("_data_files", []) if isinstance(d, dict)]
    if not names or not all(isinstance(n, str) and "/" not in n and n not in ("", ".", "..") for n in names):
        raise UserError(
            f"{folder}/state.json: no list of Arrow files (_data_files) naming files in that folder; "
            f"write the set again with datasets' save_to_disk"
        )
    for n in names:
        if not (folder / n).is_file():
            raise UserError(f"{folder}/state.json names {n}, which is not in {folder}; the save is incomplete")
    fmt = "arrow" if cfg.format in ("auto", "arrow") else cfg.format
    return Source(
        tuple(folder / n for n in names),
        fmt,
        str(folder),
        {"folder": str(folder), "root": str(folder), "split": split, "files": names, "saved_by": "datasets"},
    )


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def pick(names: list[str], given: Optional[str], setting: str, what: str) -> str:
    """One of `names`: the one given, or the only one; else a refusal that lists them."""
    if given is not None:
        if given not in names:
            raise UserError(
                f"{setting}={given}: not one of the {what} ({', '.join(names)}); set {setting}=<one of them>"
            )
        return given
    if len(names) == 1:
        return names[0]
    raise UserError(f"the {what} are {', '.join(names)}: choose one with {setting}=<name>")


def split_of(rel: str, names: tuple[str, ...] = SPLIT_NAMES) -> Optional[str]:
    """The split a data file belongs to by the Hub's naming convention: a folder named after
    it (`test/0000.parquet`) or a file name starting with it (`test-00000-of-00001.parquet`,
    `test.jsonl`, `data/test_0.parquet`)."""
    parts = rel.split("/")
    for part in parts[:-1]:
        if part in names:
            return part
    stem = parts[-1].split(".")[0]
    for name in names:
        if re.match(rf"{re.escape(name)}(?:$|[-_.\d])", stem):
            return name
    return None


def choose_split(rel: list[str], split: Optional[str], where: str) -> list[str]:
    """The files of one split among data files named by the convention (split_of). Files
    that name no split are one unnamed split, chosen when data.split is not given."""
    found = sorted({s for s in (split_of(r) for r in rel) if s})
    if split is not None:
        chosen = [r for r in rel if split_of(r, (split,)) == split]
        if not chosen:
            have = ", ".join(found) or "none by name"
            raise UserError(
                f"data.split={split}: no data file of that split in {where} (splits: {have}); fix data.split"
            )
        return chosen
    if len(found) > 1:
        raise UserError(f"{where} holds several splits ({', '.join(found)}): choose one with data.split=<name>")
    return rel


def one_format(files: tuple[Path, ...], cfg: DataConfig, where: str) -> str:
    kinds = {SHARD_FORMATS.get(p.suffix.lower(), "") for p in files}
    if len(kinds) != 1 or "" in kinds:
        raise UserError(
            f"{where}: the chosen files mix formats ({', '.join(sorted(p.name for p in files))[:300]}); "
            f"keep one format per split"
        )
    return kinds.pop() if cfg.format == "auto" else ("jsonl" if cfg.format == "json" else cfg.format)
