"""Shared model cache: atomic staging (8 concurrent stagers, one copy), verify, catalog."""

import json
import multiprocessing as mp
import os
import stat
import subprocess

import pytest

from conftest import BIN, compose
from hpc_infer.models import cache_admin
from hpc_infer.models.cache import resolve_model
from hpc_infer.errors import UserError


@pytest.fixture
def source(tmp_path):
    """A small but real model directory: config + a real safetensors file."""
    import numpy as np
    from safetensors.numpy import save_file

    src = tmp_path / "src" / "Tiny-Model"
    src.mkdir(parents=True)
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file({f"w{i}": np.full((256, 256), i, dtype=np.float32) for i in range(8)}, str(src / "model.safetensors"))
    (src / "model.safetensors").chmod(0o644)  # a model meant to be shared (safetensors writes 0600)
    return src


def _stage(src, root, q):
    q.put(str(cache_admin.stage(str(src), str(root), hf_id="org/Tiny-Model")))


def test_eight_concurrent_stagers_make_one_verified_copy(tmp_path, source):
    root = tmp_path / "shared"
    q = mp.Queue()
    procs = [mp.Process(target=_stage, args=(source, root, q)) for _ in range(8)]
    for p in procs:
        p.start()
    paths = {q.get(timeout=120) for _ in procs}
    for p in procs:
        p.join()
    assert paths == {str(root / "Tiny-Model")}
    assert sorted(p.name for p in root.iterdir() if not p.name.endswith(".lock")) == ["Tiny-Model"]  # no leftovers
    assert cache_admin.verify_dir(root / "Tiny-Model") == []
    assert (root / "Tiny-Model" / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()
    mode = (root / "Tiny-Model").stat().st_mode
    assert mode & stat.S_ISGID and mode & stat.S_IRGRP
    (entry,) = cache_admin.list_models(str(root))
    assert entry.hf_id == "org/Tiny-Model" and entry.group_readable and entry.size_bytes > 8 * 256 * 256 * 4


def test_truncated_weights_are_found_and_not_staged(tmp_path, source):
    w = source / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-1000])
    problems = cache_admin.verify_dir(source)
    assert problems and "model.safetensors" in problems[0]
    with pytest.raises(UserError, match="source is incomplete"):
        cache_admin.stage(str(source), str(tmp_path / "shared"))
    assert not (tmp_path / "shared" / "Tiny-Model").exists()


def test_catalog_lets_users_name_the_model(tmp_path, source):
    root = tmp_path / "shared"
    cache_admin.stage(str(source), str(root), name="tiny", hf_id="org/Tiny-Model")
    catalog = cache_admin.write_catalog(str(root))
    rc = compose("model=opt_125m", "model.hf_id=org/Tiny-Model", f"cluster.model_catalog={catalog}", "cluster=together")
    assert resolve_model(rc.model, rc.cluster, None) == str(root / "tiny")


def test_cli_list_and_verify(tmp_path, source):
    root = tmp_path / "shared"
    cli = [str(BIN / "hpc-infer"), "cache"]
    subprocess.run([*cli, "stage", str(source), "--root", str(root)], check=True, capture_output=True)
    out = subprocess.run([*cli, "list", "--root", str(root)], check=True, capture_output=True, text=True).stdout
    assert "Tiny-Model" in out and "drwxr-sr-x" in out
    v = subprocess.run([*cli, "verify", "--root", str(root)], capture_output=True, text=True)
    assert v.returncode == 0 and "Tiny-Model: OK" in v.stdout
    os.truncate(root / "Tiny-Model" / "model.safetensors", 100)
    v = subprocess.run([*cli, "verify", "--root", str(root)], capture_output=True, text=True)
    assert v.returncode == 1 and "BROKEN" in v.stdout


def test_list_verify_and_catalog_read_the_cache_under_the_rule(tmp_path, source):
    """The root is opened once and judged; a model whose metadata others could write, or that
    holds a link, is named and left out of the catalog (users would be sent to whatever it
    says); a link planted as catalog.json is replaced, never written through."""
    from conftest import sh

    root = tmp_path / "shared"
    cache_admin.stage(str(source), str(root), name="good", hf_id="org/Good")
    cache_admin.stage(str(source), str(root), name="bad", hf_id="org/Bad")
    meta = root / "bad" / cache_admin.META
    meta.chmod(0o666)  # anyone could now point org/Bad elsewhere
    cache_admin.stage(str(source), str(root), name="linked", hf_id="org/Linked")
    (root / "linked" / "extra.safetensors").symlink_to(tmp_path / "victim")
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (root / "catalog.json").symlink_to(victim)
    entries = {e.name: e for e in cache_admin.list_models(str(root))}
    assert entries["good"].problem is None and entries["good"].hf_id == "org/Good"
    assert "writable by everyone" in entries["bad"].problem and entries["bad"].hf_id is None
    assert "link" in entries["linked"].problem
    p = sh(tmp_path, f"hpc-infer cache catalog --root {root}")
    assert p.returncode == 0 and "bad: left out of the catalog" in p.stderr and "linked: left out" in p.stderr
    assert victim.read_text() == "precious" and not (root / "catalog.json").is_symlink()
    assert list(json.loads((root / "catalog.json").read_text())["models"]) == ["good"]
    p = sh(tmp_path, f"hpc-infer cache verify --root {root}")
    assert p.returncode == 1 and "good: OK" in p.stdout and "bad: BROKEN" in p.stdout, p.stdout + p.stderr
