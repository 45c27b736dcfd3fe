"""Model downloads and gated models through the real huggingface_hub client.

No hub is reachable here, so HF_ENDPOINT points at a local stand-in (tests/hub_standin.py)
that speaks the hub's HTTP API and its error replies; everything on our side (cache.py,
the launcher, huggingface_hub) is the real code.
"""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, run_launch
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
    return {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hf-home"),
            "HF_HUB_OFFLINE": "0", "HF_TOKEN": "", "HUGGING_FACE_HUB_TOKEN": "", **extra}


@pytest.mark.parametrize("token, hint", [("", "then set HF_TOKEN"), ("hf_fake_token_123", "the token from $HF_TOKEN has no access yet")])
def test_gated_model_message_before_submission(tmp_path, hub, token, hint):
    p = run_launch(tmp_path, "model=llama32_1b_instruct", "cluster=local", "wait=false",
                   f"cluster.hf_home={tmp_path / 'shared-hf'}", env=_env(hub, tmp_path, HF_TOKEN=token),
                   check=False, timeout=180)
    assert p.returncode == 2, p.stderr
    assert f"Access to model {GATED} is restricted: request access on its Hugging Face page, {hint}" in p.stderr
    assert "Traceback" not in p.stderr and not list((tmp_path / "runs").rglob("jobs.json"))
    assert token == "" or token not in p.stderr


def test_missing_model_named(tmp_path, hub):
    p = run_launch(tmp_path, "model=opt_125m", "model.hf_id=org/no-such-model", "cluster=local", "wait=false",
                   f"cluster.hf_home={tmp_path / 'shared-hf'}", env=_env(hub, tmp_path), check=False, timeout=180)
    assert p.returncode == 2 and "model org/no-such-model does not exist on the Hugging Face hub" in p.stderr


RESOLVE = """
import sys
from hpc_infer.models.cache import resolve_model
from hpc_infer.config import ClusterConfig, ModelConfig
print(resolve_model(ModelConfig(name="tiny", hf_id="org/tiny"), ClusterConfig(name="c", hf_home=sys.argv[1]), None))
"""


def test_concurrent_launches_download_once(tmp_path, hub):
    shared = tmp_path / "shared-hf"
    procs = [subprocess.Popen([sys.executable, "-c", RESOLVE, str(shared)], cwd=ROOT, env=_env(hub, tmp_path),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(6)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    paths = {o.strip().splitlines()[-1] for o, _ in outs}
    assert len(paths) == 1 and str(shared) in paths.pop()
    assert sorted(hub.downloads) == ["org/tiny/config.json", "org/tiny/model.safetensors"]  # once each, not 6x


def test_offline_environment_is_named(tmp_path, hub):
    p = run_launch(tmp_path, "model=opt_125m", "model.hf_id=org/tiny", "cluster=local", "wait=false",
                   f"cluster.hf_home={tmp_path / 'shared-hf'}", env=_env(hub, tmp_path, HF_HUB_OFFLINE="1"),
                   check=False, timeout=180)
    assert p.returncode == 2 and "HF_HUB_OFFLINE=1 is set" in p.stderr, p.stderr
