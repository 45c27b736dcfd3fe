"""Bad input through the real command line: one clear message, exit 2, nothing submitted."""

import pytest

from conftest import run_launch


@pytest.mark.parametrize(
    "content, overrides, expect",
    [
        ('{"prompt": "a"}\n{"prompt": \n', [], "line 2: invalid JSON"),
        ('{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n', [], "line 2: duplicate id '1'"),
        ("", [], "no records"),
        ('{"prompt": "a"}\n', ["sampling.temperature=-0.5"], "sampling.temperature: -0.5 must be >= 0"),
        ('{"prompt": "a"}\n', ["model=smollm2_cpu", "model.path=/nope"], "model.path=/nope: no model there"),
        ('{"prompt": "a"}\n', ["+cluster.env.HF_TOKEN=hf_x"], "secrets do not belong in the config"),
        ('{"prompt": "a"}\n', ["cluster.nodes_per_task=2"], "a model across nodes needs Slurm allocations"),
    ],
)
def test_rejected_before_submission(tmp_path, content, overrides, expect):
    data = tmp_path / "in.jsonl"
    data.write_text(content)
    p = run_launch(tmp_path, f"data.path={data}", "cluster=local", *overrides, check=False, timeout=600)
    assert p.returncode == 2, p.stderr
    assert expect in p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("jobs.json"))


@pytest.mark.parametrize("command", ["hpc-infer launch", "hpc-infer sbatch", "hpc-infer serve"])
@pytest.mark.parametrize(
    "override, expect",
    [
        ("samplng.temperature=0", "samplng: unknown setting; did you mean sampling?"),
        ("+samplng.temperature=0", "samplng: unknown setting; did you mean sampling?"),
        ("sampling.temprature=0", "sampling.temprature: unknown setting; did you mean sampling.temperature?"),
        ("cluster.wokers=2", "cluster.wokers: unknown setting; did you mean cluster.workers?"),
        ("model=qwen_mth", "model=qwen_mth: no such model config; did you mean model=qwen_math?"),
        ("cluster=togther", "cluster=togther: no such cluster config; did you mean cluster=together?"),
    ],
)
def test_typos_get_our_message_the_nearest_name_and_exit_2(tmp_path, command, override, expect):
    """Typos with or without `+`, in keys and group options: one door, our words, exit 2
    (Hydra's own messages exit 1 and name no fix)."""
    p = run_launch(tmp_path, override, check=False, timeout=600, command=command)
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert expect in p.stderr and "Traceback" not in p.stderr and "HYDRA_FULL_ERROR" not in p.stderr, p.stderr
    assert not (tmp_path / "runs").exists()


def test_home_relative_paths_and_new_free_form_keys_work_as_typed(tmp_path):
    """`data.path=~/prompts.jsonl` (Hydra's parser refuses a leading ~) and `cluster.env.X=1`
    (Hydra wants + for a key the config lacks) as a user types them."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "prompts.jsonl").write_text('{"prompt": "hi"}\n')
    p = run_launch(
        tmp_path,
        "data.path=~/prompts.jsonl",
        "cluster.env.MY_SETTING=1",
        "cluster=slurm_local",
        env={"HOME": str(home)},
        command="hpc-infer sbatch",
        check=False,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr
    script = next((tmp_path / "runs").rglob("job.sbatch")).read_text()
    assert "MY_SETTING" in script or "MY_SETTING" in next((tmp_path / "runs").rglob("worker.json")).read_text()
    manifest = next((tmp_path / "runs").rglob("manifest.json")).read_text()
    assert str(home / "prompts.jsonl") in manifest


def test_sbatch_for_a_non_slurm_cluster_says_what_it_assumed(tmp_path):
    p = run_launch(tmp_path, "cluster=local", command="hpc-infer sbatch", check=False, timeout=600)
    assert p.returncode == 0 and "cluster=local is not a Slurm cluster (backend local)" in p.stderr, p.stderr
