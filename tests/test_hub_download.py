"""Model downloads and gated models through the real huggingface_hub client.

No hub is reachable here, so HF_ENDPOINT points at a local stand-in (tests/hub_standin.py)
that speaks the hub's HTTP API and its error replies; everything on our side (cache.py,
the launcher, huggingface_hub) is the real code.
"""

import json
import subprocess

import pytest

from conftest import run_launch, user_env
from hub_standin import HubStandIn

GATED = "meta-llama/Llama-3.2-1B-Instruct"
TINY = {"config.json": json.dumps({"model_type": "llama"}).encode(), "model.safetensors": b"\0" * 4096}


@pytest.fixture
def hub(tmp_path):
    h = HubStandIn({"org/tiny": TINY}, gated={GATED})
    yield h
    h.close()


def _env(hub, tmp_path, **extra):
    # HF_HUB_OFFLINE=0: in-process debug workers of earlier tests set it to 1 in this process.
    return {
        "HF_ENDPOINT": hub.url,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_OFFLINE": "0",
        "HF_TOKEN": "",
        "HUGGING_FACE_HUB_TOKEN": "",
        **extra,
    }


@pytest.mark.parametrize(
    "token, hint", [("", "then set HF_TOKEN"), ("hf_fake_token_123", "the token from $HF_TOKEN has no access yet")]
)
def test_gated_model_message_before_submission(tmp_path, hub, token, hint):
    p = run_launch(
        tmp_path,
        "model=llama32_1b_instruct",
        "cluster=local",
        "wait=false",
        f"cluster.hf_home={tmp_path / 'shared-hf'}",
        env=_env(hub, tmp_path, HF_TOKEN=token),
        check=False,
        timeout=600,
    )
    assert p.returncode == 2, p.stderr
    assert f"Access to model {GATED} is restricted: request access on its Hugging Face page, {hint}" in p.stderr
    assert "Traceback" not in p.stderr and not list((tmp_path / "runs").rglob("jobs.json"))
    assert token == "" or token not in p.stderr


def test_missing_model_named(tmp_path, hub):
    p = run_launch(
        tmp_path,
        "model=opt_125m",
        "model.hf_id=org/no-such-model",
        "cluster=local",
        "wait=false",
        f"cluster.hf_home={tmp_path / 'shared-hf'}",
        env=_env(hub, tmp_path),
        check=False,
        timeout=600,
    )
    assert p.returncode == 2 and "model org/no-such-model does not exist on the Hugging Face hub" in p.stderr


def test_offline_environment_is_named(tmp_path, hub):
    p = run_launch(
        tmp_path,
        "model=opt_125m",
        "model.hf_id=org/tiny",
        "cluster=local",
        "wait=false",
        f"cluster.hf_home={tmp_path / 'shared-hf'}",
        env=_env(hub, tmp_path, HF_HUB_OFFLINE="1"),
        check=False,
        timeout=600,
    )
    assert p.returncode == 2 and "HF_HUB_OFFLINE=1 is set" in p.stderr, p.stderr


def test_admins_stage_from_the_hub_as_written(tmp_path):
    """docs/admins.md's `cache stage` of a hub id: fetched once through the real
    huggingface_hub client, staged under the root, listed with its id; a second stage
    downloads nothing."""
    from doc_commands import as_written

    import numpy as np
    from safetensors.numpy import save

    files = {"config.json": TINY["config.json"], "model.safetensors": save({"w": np.ones((8, 8), dtype=np.float32)})}
    hub = HubStandIn({"Qwen/Qwen2.5-Math-1.5B": files}, gated=set())
    try:
        line = as_written(
            "hpc-infer cache stage Qwen/Qwen2.5-Math-1.5B --root /data/models",
            {"/data/models": str(tmp_path / "models")},
        )
        env = user_env(_env(hub, tmp_path))
        p = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        staged = [f for f in (tmp_path / "models").rglob("model.safetensors")]
        assert len(staged) == 1 and staged[0].read_bytes() == files["model.safetensors"], staged
        assert sorted(hub.downloads) == [
            "Qwen/Qwen2.5-Math-1.5B/config.json",
            "Qwen/Qwen2.5-Math-1.5B/model.safetensors",
        ]
        listed = subprocess.run(
            ["bash", "-c", f"hpc-infer cache list --root {tmp_path / 'models'}"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert "Qwen/Qwen2.5-Math-1.5B" in listed.stdout, listed.stdout + listed.stderr
        again = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0 and len(hub.downloads) == 2, (again.stderr[-2000:], hub.downloads)
    finally:
        hub.close()
