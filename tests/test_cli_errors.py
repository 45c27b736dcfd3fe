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
        ('{"prompt": "a"}\n', ["cluster.nodes_per_task=2"], "use `hpc-infer sbatch`"),
    ],
)
def test_rejected_before_submission(tmp_path, content, overrides, expect):
    data = tmp_path / "in.jsonl"
    data.write_text(content)
    p = run_launch(tmp_path, f"data.path={data}", "cluster=local", *overrides, check=False, timeout=120)
    assert p.returncode == 2, p.stderr
    assert expect in p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("jobs.json"))


def test_unknown_config_key_is_named(tmp_path):
    p = run_launch(tmp_path, "sampling.temprature=0.5", check=False, timeout=120)
    assert p.returncode != 0 and "temprature" in p.stderr and "Traceback" not in p.stderr
