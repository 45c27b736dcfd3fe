"""Prompt sets where researchers keep them: Hub dataset repos (hf://datasets/ORG/NAME[@rev]),
folders of parquet or jsonl shards, and folders written by `datasets.save_to_disk`.

No hub is reachable here, so HF_ENDPOINT points at tests/hub_standin.py, which lays out
dataset repos as the Hub does (card configs, `data/` shards, `refs/convert/parquet`,
tags, gated 403). Everything on our side is the real code: the installed console script,
huggingface_hub, pyarrow, the planner and workers (the fake engine stands in for vLLM only).
Data comes in the real sets' shapes: MATH-500 (problem/solution/answer/subject/level/
unique_id, one test.jsonl) and GSM8K (question/answer ending in `#### N`, subsets main and
socratic as parquet).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import read_results, run_launch, user_env
from hub_standin import HubStandIn, commit_of
from test_hub_download import _env

FAKE = {"HPC_INFER_FAKE_ENGINE": json.dumps({"step_s": 0.001, "max_num_seqs": 8})}
MATH = [
    {
        "problem": f"What is ${i} + {i}$?",
        "solution": f"${i} + {i} = {2 * i}$, so the answer is $\\boxed{{{2 * i}}}$.",
        "answer": str(2 * i),
        "subject": ["Algebra", "Prealgebra", "Number Theory"][i % 3],
        "level": 1 + i % 5,
        "unique_id": f"test/{['algebra', 'prealgebra', 'number_theory'][i % 3]}/{100 + i}.json",
    }
    for i in range(24)
]
MATH_CARD = b"""---
configs:
- config_name: default
  data_files:
  - split: test
    path: test.jsonl
---
# MATH-500
"""
GSM_CARD = b"""---
configs:
- config_name: main
  data_files:
  - split: train
    path: main/train-*
  - split: test
    path: main/test-*
- config_name: socratic
  data_files:
  - split: train
    path: socratic/train-*
  - split: test
    path: socratic/test-*
---
"""


def gsm(split: str, n: int) -> list[dict]:
    return [
        {"question": f"{split}: Tom has {i} apples and buys 3. How many?", "answer": f"{i} + 3 = {i + 3}\n#### {i + 3}"}
        for i in range(n)
    ]


def parquet(rows: list[dict], row_group_size: int | None = None) -> bytes:
    b = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), b, row_group_size=row_group_size)
    return b.getvalue()


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture
def hub():
    h = HubStandIn(
        {},
        set(),
        datasets={
            "HuggingFaceH4/MATH-500": {
                "main": {"README.md": MATH_CARD, "test.jsonl": jsonl(MATH), ".gitattributes": b"*.jsonl lfs\n"},
                "v0": {"README.md": MATH_CARD, "test.jsonl": jsonl(MATH[:10])},
            },
            "openai/gsm8k": {
                "main": {
                    "README.md": GSM_CARD,
                    "main/train-00000-of-00001.parquet": parquet(gsm("train", 30)),
                    "main/test-00000-of-00002.parquet": parquet(gsm("test", 9)),
                    "main/test-00001-of-00002.parquet": parquet(gsm("test2", 7)),
                    "socratic/train-00000-of-00001.parquet": parquet(gsm("s-train", 5)),
                    "socratic/test-00000-of-00001.parquet": parquet(gsm("s-test", 4)),
                }
            },
            "org/scripted": {  # a loading-script set: only the Hub's parquet conversion has data
                "main": {"README.md": b"# scripted\n", "scripted.py": b"import datasets\n"},
                "refs/convert/parquet": {
                    "default/test/0000.parquet": parquet(gsm("conv-test", 6)),
                    "default/train/0000.parquet": parquet(gsm("conv-train", 3)),
                },
            },
        },
        gated_datasets={"meta-llama/gated-evals"},
    )
    yield h
    h.close()


def hub_env(hub, tmp_path, **extra) -> dict:
    """test_hub_download's environment for the stand-in, with the fake engine."""
    return _env(hub, tmp_path, **FAKE, **extra)


def test_math500_from_the_hub_end_to_end(tmp_path, hub):
    """`data=math_r1_zero data.path=hf://datasets/HuggingFaceH4/MATH-500`: fetched once on the
    login node into the shared cache, every record merged in the set's order, graded, and the
    commit named in the fingerprint, manifest and summary; the same command again resumes the
    complete run and fetches nothing."""
    args = (
        "cluster=local",
        "cluster.workers=2",
        "data=math_r1_zero",
        "data.path=hf://datasets/HuggingFaceH4/MATH-500",
        "sampling.max_tokens=4",
        f"cluster.hf_home={tmp_path / 'shared-hf'}",
        "run_name=math500",
    )
    token = "hf_DATASET_" + os.urandom(8).hex()  # sent to the Hub; in no file the run writes
    p = run_launch(tmp_path, *args, env=hub_env(hub, tmp_path, HF_TOKEN=token))
    run = tmp_path / "runs" / "math500"
    assert {auth for _m, path, auth in hub.requests if "/datasets/" in path} == {f"Bearer {token}"}, hub.requests
    leaked = [f for f in tmp_path.rglob("*") if f.is_file() and not f.is_symlink() and token.encode() in f.read_bytes()]
    assert leaked == [] and token not in p.stdout + p.stderr
    results = read_results(run / "results.jsonl")
    assert [r["id"] for r in results] == [m["unique_id"] for m in MATH]
    sha = commit_of("HuggingFaceH4/MATH-500", "main")
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["input"] == f"hf://datasets/HuggingFaceH4/MATH-500@{sha}"
    assert manifest["fingerprint"]["input revision"] == f"HuggingFaceH4/MATH-500@{sha}"
    assert manifest["source"] == {
        "hub": "HuggingFaceH4/MATH-500",
        "revision": sha,
        "asked": "main",
        "subset": "default",
        "split": "test",
        "files": ["test.jsonl"],
    }
    summary = json.loads((run / "summary.json").read_text())
    assert summary["input"]["revision"] == sha and summary["input"]["split"] == "test"
    assert summary["postprocess"]["records"] == len(MATH)  # graded against the set's answers
    assert sorted(hub.downloads) == ["HuggingFaceH4/MATH-500/README.md", "HuggingFaceH4/MATH-500/test.jsonl"]
    assert list((tmp_path / "shared-hf" / "hub").glob("datasets--HuggingFaceH4--MATH-500/snapshots/*/test.jsonl"))
    again = run_launch(tmp_path, *args, env=hub_env(hub, tmp_path))
    assert "already complete" in again.stderr, again.stderr[-2000:]
    assert len(hub.downloads) == 2, hub.downloads  # cached at the commit: nothing fetched again
    assert "Traceback" not in p.stderr + again.stderr


def test_gsm8k_subset_split_and_pinned_revision(tmp_path, hub):
    """GSM8K's card defines subsets main and socratic; the test split of main is two parquet
    shards, read in order. Without a subset the refusal lists them, before any job."""
    env = hub_env(hub, tmp_path)
    base = (
        "cluster=local",
        "data.path=hf://datasets/openai/gsm8k",
        "data.id_field=null",
        "data.prompt_field=question",
        "sampling.max_tokens=2",
        f"cluster.hf_home={tmp_path / 'shared-hf'}",
    )
    refused = run_launch(tmp_path, *base, "run_name=nosubset", env=env, check=False)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "are main, socratic: choose one with data.subset=<name>" in refused.stderr
    assert not (tmp_path / "runs" / "nosubset").exists() and "Traceback" not in refused.stderr
    wrong = run_launch(tmp_path, *base, "data.subset=main", "data.split=dev", "run_name=dev", env=env, check=False)
    assert (
        wrong.returncode == 2
        and "data.split=dev: not one of the splits" in wrong.stderr
        and "(test, train)" in wrong.stderr
    )
    run_launch(tmp_path, *base, "data.subset=main", "data.split=test", "run_name=gsm", env=env)
    results = read_results(tmp_path / "runs" / "gsm" / "results.jsonl")
    expected = gsm("test", 9) + gsm("test2", 7)
    assert [r["prompt"] for r in results] == [g["question"] for g in expected]
    assert all(r["fields"]["answer"].split("#### ")[1].isdigit() for r in results)
    got = {d.removeprefix("openai/gsm8k/") for d in hub.downloads}
    assert got == {"README.md", "main/test-00000-of-00002.parquet", "main/test-00001-of-00002.parquet"}, got


def test_a_revision_is_pinned_and_named(tmp_path, hub):
    """@v0 reads the tag's commit, not main's; the summary says which."""
    run_launch(
        tmp_path,
        "cluster=local",
        "data=math_r1_zero",
        "data.path=hf://datasets/HuggingFaceH4/MATH-500@v0",
        "sampling.max_tokens=2",
        f"cluster.hf_home={tmp_path / 'shared-hf'}",
        "run_name=v0",
        env=hub_env(hub, tmp_path),
    )
    summary = json.loads((tmp_path / "runs" / "v0" / "summary.json").read_text())
    assert summary["records"] == 10 and summary["input"]["revision"] == commit_of("HuggingFaceH4/MATH-500", "v0")
    assert summary["input"]["asked"] == "v0"


def test_a_script_set_reads_the_hubs_parquet_conversion(tmp_path, hub):
    run_launch(
        tmp_path,
        "cluster=local",
        "data.path=hf://datasets/org/scripted",
        "data.split=test",
        "data.id_field=null",
        "data.prompt_field=question",
        "sampling.max_tokens=2",
        f"cluster.hf_home={tmp_path / 'shared-hf'}",
        "run_name=conv",
        env=hub_env(hub, tmp_path),
    )
    manifest = json.loads((tmp_path / "runs" / "conv" / "manifest.json").read_text())
    assert manifest["n_records"] == 6 and manifest["source"]["asked"] == "refs/convert/parquet"
    assert manifest["source"]["files"] == ["default/test/0000.parquet"]


@pytest.mark.parametrize("token", ["", "hf_fake_dataset_token_42"])
def test_gated_set_refused_with_the_fix_before_submission(tmp_path, hub, token):
    p = run_launch(
        tmp_path,
        "cluster=local",
        "data.path=hf://datasets/meta-llama/gated-evals",
        f"cluster.hf_home={tmp_path / 'shared-hf'}",
        env=hub_env(hub, tmp_path, HF_TOKEN=token),
        check=False,
    )
    assert p.returncode == 2, p.stderr[-2000:]
    assert (
        "the dataset is gated: accept its terms on https://huggingface.co/datasets/meta-llama/gated-evals" in p.stderr
    )
    assert ("then set HF_TOKEN" if not token else "the token from $HF_TOKEN has no access to it yet") in p.stderr
    assert "Traceback" not in p.stderr and not list((tmp_path / "runs").rglob("jobs.json"))
    if token:
        assert token not in p.stdout + p.stderr
        assert any(auth == f"Bearer {token}" for _m, _p, auth in hub.requests)  # sent to the Hub, nowhere else


def test_offline_reads_the_cached_copy_or_says_how_to_get_one(tmp_path, hub):
    args = (
        "cluster=local",
        "data=math_r1_zero",
        "data.path=hf://datasets/HuggingFaceH4/MATH-500",
        "sampling.max_tokens=2",
        f"cluster.hf_home={tmp_path / 'shared-hf'}",
    )
    none = run_launch(tmp_path, *args, "run_name=a", env=hub_env(hub, tmp_path, HF_HUB_OFFLINE="1"), check=False)
    assert none.returncode == 2 and "HF_HUB_OFFLINE=1 is set and the cache" in none.stderr, none.stderr[-2000:]
    run_launch(tmp_path, *args, "run_name=b", env=hub_env(hub, tmp_path))
    hub.close()  # the Hub is gone: the cached commit is enough
    run_launch(tmp_path, *args, "run_name=c", env=hub_env(hub, tmp_path, HF_HUB_OFFLINE="1"))
    a = json.loads((tmp_path / "runs" / "b" / "manifest.json").read_text())
    c = json.loads((tmp_path / "runs" / "c" / "manifest.json").read_text())
    assert a["fingerprint"] == c["fingerprint"] and a["input"] == c["input"]


def test_bad_address_is_named_before_anything(tmp_path):
    p = run_launch(tmp_path, "cluster=local", "data.path=hf://models/org/x", check=False)
    assert p.returncode == 2 and "not a Hub dataset address; write hf://datasets/ORG/NAME" in p.stderr, p.stderr


# ---- folders on shared storage -------------------------------------------------------------


def save_to_disk_layout(root: Path, splits: dict[str, list[dict]]) -> None:
    """What datasets' DatasetDict.save_to_disk writes (Arrow IPC streams + state.json per split)."""
    root.mkdir(parents=True)
    (root / "dataset_dict.json").write_text(json.dumps({"splits": list(splits)}))
    for name, rows in splits.items():
        d = root / name
        d.mkdir()
        table = pa.Table.from_pylist(rows)
        files = []
        for k, part in enumerate((table.slice(0, len(rows) // 2), table.slice(len(rows) // 2))):
            fname = f"data-{k:05d}-of-00002.arrow"
            with pa.OSFile(str(d / fname), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
                w.write_table(part, max_chunksize=3)
            files.append({"filename": fname})
        (d / "state.json").write_text(json.dumps({"_data_files": files, "_fingerprint": "x", "_split": name}))
        (d / "dataset_info.json").write_text(json.dumps({"features": {}}))


def test_save_to_disk_folder_and_parquet_shards(tmp_path):
    from hpc_infer.config import DataConfig
    from hpc_infer.errors import UserError
    from hpc_infer.io import sources
    from hpc_infer.io.data import load_records

    saved = tmp_path / "gsm8k_saved"
    save_to_disk_layout(saved, {"train": gsm("train", 11), "test": gsm("test", 8)})
    cfg = DataConfig(name="g", path=str(saved), id_field=None, prompt_field="question", split="test")
    records = load_records(cfg)
    assert [r.prompt for r in records] == [g["question"] for g in gsm("test", 8)]
    with pytest.raises(UserError, match="splits of .* are train, test: choose one with data.split"):
        load_records(DataConfig(name="g", path=str(saved), id_field=None, prompt_field="question"))

    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "test-00000-of-00002.parquet").write_bytes(parquet(MATH[:15], row_group_size=4))
    rows = MATH[15:]
    rows[3] = dict(rows[3], problem=None)  # row 19 of the split, in the second shard
    (shards / "test-00001-of-00002.parquet").write_bytes(parquet(rows))
    (shards / "train-00000-of-00001.parquet").write_bytes(parquet(MATH[:2]))
    sources._RESOLVED.clear()
    cfg = DataConfig(name="m", path=str(shards), id_field="unique_id", prompt_field="problem", split="test")
    with pytest.raises(UserError) as e:
        load_records(cfg)
    assert f"{shards} (test-00001-of-00002.parquet) row 19:" in str(e.value), str(e.value)
    (shards / "test-00001-of-00002.parquet").write_bytes(parquet(MATH[15:]))
    sources._RESOLVED.clear()
    records = load_records(cfg)
    assert [r.id for r in records] == [m["unique_id"] for m in MATH]


def test_folder_launch_through_the_console_script(tmp_path):
    """A save_to_disk folder as data.path, as a user types it."""
    saved = tmp_path / "shared" / "math_saved"
    save_to_disk_layout(saved, {"test": MATH})
    run_launch(
        tmp_path,
        "cluster=local",
        "data=math_r1_zero",
        f"data.path={saved}",
        "sampling.max_tokens=2",
        "run_name=saved",
        env=FAKE,
    )
    results = read_results(tmp_path / "runs" / "saved" / "results.jsonl")
    assert [r["id"] for r in results] == [m["unique_id"] for m in MATH]
    manifest = json.loads((tmp_path / "runs" / "saved" / "manifest.json").read_text())
    assert manifest["source"]["files"] == ["data-00000-of-00002.arrow", "data-00001-of-00002.arrow"]


def test_readme_hub_example_as_written(tmp_path, hub):
    """README's Hub line, run as written against the stand-in (the user's shell, outside the checkout)."""
    from doc_commands import as_written

    line = as_written(
        "hpc-infer launch data=math_r1_zero data.path=hf://datasets/HuggingFaceH4/MATH-500 data.split=test",
        {},
    )
    env = user_env(hub_env(hub, tmp_path))
    p = subprocess.run(
        ["bash", "-c", f"{line} output_root={tmp_path / 'runs'} sampling.max_tokens=2 run_name=readme"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert len(read_results(tmp_path / "runs" / "readme" / "results.jsonl")) == len(MATH)
