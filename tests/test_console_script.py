"""Every `hpc-infer` subcommand through the installed console script, in bash, from a
directory outside the checkout: the door users take (a `python -m` test does not cover it)."""

import json
from pathlib import Path

import pytest

from conftest import BIN, compose, sh, user_env
from doc_commands import as_written

from hpc_infer.run.plan import plan_input, prepare
from hpc_infer.rundir import read_chunk_records, encode_chunk_output, read_json, write_atomic


@pytest.fixture
def finished_run(tmp_path):
    """A run whose chunks hold outputs as workers write them (no engine needed)."""
    rc = compose("data=math_r1_zero", "data.limit=4", "cluster=local", f"output_root={tmp_path / 'runs'}")
    from omegaconf import OmegaConf

    run, _ = prepare(rc, plan_input(rc), "/m", OmegaConf.to_yaml(OmegaConf.structured(rc)))
    for cid in range(read_json(run.manifest)["n_chunks"]):
        rows = [
            dict(r, text="x</think> <answer>1</answer>", outputs=[{"text": "x"}], prompt_tokens=1, output_tokens=1)
            for r in read_chunk_records(run, cid)
        ]
        write_atomic(run.out_path(cid), encode_chunk_output(cid, rows, worker="w1", started=1.0, finished=2.0))
    return run


def test_help_of_every_entry(tmp_path):
    p = sh(tmp_path, "hpc-infer --help")
    assert p.returncode == 0
    for cmd in ("launch", "sbatch", "status", "cancel", "merge", "cache", "image", "model"):
        assert cmd in p.stdout
    for entry, name in (
        ("hpc-infer launch --help", "hpc-infer launch"),
        ("hpc-infer sbatch --help", "hpc-infer sbatch"),
        ("hpc-infer serve --help", "hpc-infer serve"),
        ("python -m hpc_infer.launch --help", "hpc-infer launch"),
    ):
        p = sh(tmp_path, entry)
        assert p.returncode == 0 and "Traceback" not in p.stderr, (entry, p.stderr[-2000:])
        assert p.stdout.startswith(f"{name} is powered by Hydra")  # the command the user typed, not a module
        assert "model: " in p.stdout and "smollm2_cpu" in p.stdout
        assert "_schema" not in p.stdout  # internal ConfigStore names are not choices


def test_launch_and_sbatch_find_their_configs(tmp_path):
    # the bug users hit: "Primary config module 'hpc_infer.conf' not found"
    p = sh(tmp_path, f"hpc-infer sbatch cluster=slurm_local data.limit=2 output_root={tmp_path}/runs")
    assert p.returncode == 0, p.stderr[-3000:]
    script = tmp_path / "runs" / "example__smollm2_cpu__chat" / "job.sbatch"
    assert p.stdout.strip() == str(script) and script.read_text().startswith("#!/bin/bash")


def test_slurm_cluster_without_slurm_is_refused_before_planning(tmp_path):
    env = user_env()
    env["PATH"] = str(BIN)  # a machine without Slurm's commands
    p = sh(tmp_path, f"hpc-infer launch cluster=together output_root={tmp_path}/runs", env=env)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "cluster=together uses the slurm backend" in p.stderr and "cluster=local" in p.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "override, expect",
    [
        ("+samplng.temperature=0", "samplng: unknown setting; did you mean sampling?"),
        ("+sampling.temprature=0", "sampling.temprature: unknown setting; did you mean sampling.temperature?"),
        ("+model.engine_kwargs.hf_token=hf_abcdefghijklmnopqrstuvwx", "model.engine_kwargs.hf_token: secrets do not"),
    ],
)
def test_refusals_name_the_setting(tmp_path, override, expect):
    p = sh(tmp_path, f"hpc-infer launch '{override}' cluster=local output_root={tmp_path}/runs")
    assert p.returncode == 2 and expect in p.stderr, p.stderr[-2000:]
    assert "hf_abcdefghijklmnopqrstuvwx" not in p.stdout + p.stderr
    assert not (tmp_path / "runs").exists()


def test_status_merge_cancel_on_a_run_as_the_docs_write_them(tmp_path, finished_run):
    """README's "On a Slurm cluster" block and docs/ai-cloud-users.md, line by line, with
    runs/<run> the run's own directory (relative: typed where the run was launched)."""
    run = {"runs/<run>": f"runs/{finished_run.root.name}"}
    root = finished_run.root
    p = sh(tmp_path, as_written("hpc-infer status runs/<run>", run))
    n = read_json(finished_run.manifest)["n_chunks"]
    assert p.returncode == 0 and f"chunks {n}/{n}" in p.stdout and "records 4/4" in p.stdout
    for options in ("", "--partial", "--format parquet"):
        merge = as_written(
            "hpc-infer merge  runs/<run> [--partial] [--format parquet]",
            {**run, "[--partial] [--format parquet]": options},
        )
        p = sh(tmp_path, merge)
        assert p.returncode == 0 and "4/4 records" in p.stdout, p.stderr
    assert (root / "results.parquet").is_file() and not (root / "results.partial.jsonl").exists()  # complete run
    p = sh(tmp_path, as_written("hpc-infer merge runs/<run>", run))  # docs/ai-cloud-users.md
    assert p.returncode == 0 and "4/4 records" in p.stdout, p.stderr
    graded = [json.loads(line) for line in (root / "results.jsonl").read_text().splitlines()]
    assert [r["answer_reward"] for r in graded] == [float(r["fields"]["answer"] == "1") for r in graded]
    p = sh(tmp_path, as_written("hpc-infer cancel runs/<run>", run))
    assert p.returncode == 0 and "cancelled 0 tasks" in p.stdout
    p = sh(tmp_path, f"hpc-infer status {tmp_path}")
    assert p.returncode == 2 and "not a run directory" in p.stderr
    # `hpc-infer sbatch model=... cluster=...`: the embedded CPU model on the local Slurm's config
    p = sh(
        tmp_path,
        as_written(
            "hpc-infer sbatch model=... cluster=...",
            {"model=...": "model=smollm2_cpu", "cluster=...": "cluster=slurm_local"},
        ),
    )
    assert p.returncode == 0 and (tmp_path / "runs/example__smollm2_cpu__chat/job.sbatch").is_file(), p.stderr


def test_ai_cloud_users_sbatch_as_typed_stops_at_the_missing_image(tmp_path):
    """docs/ai-cloud-users.md's sbatch line as typed, prompts in ~: here, without the AI
    Cloud's image, it stops before writing anything, naming the image and the fix (on the
    AI Cloud it renders; tests/test_cli_errors.py renders the same ~ path for slurm_local)."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "prompts.jsonl").write_text('{"prompt": "hi"}\n')
    p = sh(
        tmp_path,
        as_written("hpc-infer sbatch cluster=aau_ai_cloud model=llama32_1b_instruct data.path=~/prompts.jsonl"),
        env=user_env({"HOME": str(home)}),
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "cluster.container.image: image /home/container/vllm-openai_latest.sif does not exist" in p.stderr
    assert "hpc-infer image pull" in p.stderr and not (tmp_path / "runs").exists()


def test_cache_image_model_subcommands(tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    (tmp_path / "models").mkdir()
    p = sh(tmp_path, f"hpc-infer cache list --root {tmp_path}/models")
    assert p.returncode == 0 and "name" in p.stdout
    src = tmp_path / "dl" / "Llama-3.1-8B"  # docs/admins.md, line by line: stage, verify, catalog, list
    src.mkdir(parents=True)
    (src / "config.json").write_text('{"model_type": "llama"}')
    save_file({"w": np.ones((64, 64), dtype=np.float32)}, str(src / "model.safetensors"))
    (src / "model.safetensors").chmod(0o644)
    fill = {"/scratch/dl/Llama-3.1-8B": str(src), "/data/models": f"{tmp_path}/models"}
    p = sh(
        tmp_path,
        as_written(
            "hpc-infer cache stage /scratch/dl/Llama-3.1-8B --root /data/models --hf-id meta-llama/Llama-3.1-8B", fill
        ),
    )
    assert p.returncode == 0 and (tmp_path / "models" / "Llama-3.1-8B" / "model.safetensors").is_file(), p.stderr
    p = sh(tmp_path, as_written("hpc-infer cache verify --root /data/models", fill))
    assert p.returncode == 0 and "Llama-3.1-8B" in p.stdout + p.stderr, p.stdout + p.stderr
    p = sh(tmp_path, as_written("hpc-infer cache catalog --root /data/models", fill))
    catalog = json.loads((tmp_path / "models" / "catalog.json").read_text())
    assert p.returncode == 0 and "meta-llama/Llama-3.1-8B" in json.dumps(catalog), catalog
    p = sh(tmp_path, as_written("hpc-infer cache list --root /data/models", fill))
    assert p.returncode == 0 and "Llama-3.1-8B" in p.stdout and "meta-llama/Llama-3.1-8B" in p.stdout, p.stdout
    p = sh(tmp_path, f"hpc-infer image build --dest {tmp_path}/h.sif --dry-run --runtime apptainer")
    assert p.returncode == 0 and p.stdout.startswith(f"apptainer build --fakeroot {tmp_path}/h.sif"), p.stderr
    (tmp_path / "bad.sif").write_bytes(b"not an image")
    p = sh(tmp_path, f"hpc-infer image inspect {tmp_path}/bad.sif")
    assert p.returncode == 2 and "bad.sif" in p.stderr, p.stderr
    p = sh(
        tmp_path,
        f"hpc-infer image pull docker://vllm/vllm-openai:v0.11.0 --dest {tmp_path}/v.sif --dry-run --runtime apptainer",
    )
    assert p.returncode == 0 and p.stdout.startswith("apptainer pull"), p.stderr
    p = sh(tmp_path, "hpc-infer model build-cpu")  # built once (the fixtures' model): prints where it is
    assert p.returncode == 0, p.stderr
    built = Path(p.stdout.strip().splitlines()[-1])
    config = json.loads((built / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30  # SmolLM2-135M
    assert (built / "tokenizer.json").is_file() and sorted(built.glob("*.safetensors"))
