"""The login-node sampling check: a passed check is remembered, keyed by everything it read;
a refusal never is."""

import importlib.util
import os
import types
from pathlib import Path

import pytest

from conftest import need
from hpc_infer.errors import UserError
from hpc_infer.models import vllm_check
from hpc_infer.models.vllm_check import check_sampling

need("vllm")


def test_a_passed_check_is_remembered_and_a_refusal_is_not(tmp_path, monkeypatch):
    monkeypatch.setenv("HPC_INFER_CACHE", str(tmp_path))
    greedy = {"temperature": 0.0, "max_tokens": 7}
    first = check_sampling(greedy)
    assert first.startswith("sampling checked against vLLM ") and "remembered" not in first
    (kept,) = (tmp_path / "checks").iterdir()
    assert kept.read_text() == first
    assert check_sampling(greedy) == first + " (this check passed before: remembered)"
    # other settings, or other request bodies, are checked anew
    assert "remembered" not in check_sampling(dict(greedy, max_tokens=8))
    bodies = check_sampling(greedy, [{"max_tokens": 3}, {"logprobs": -3}], base={})
    assert "1 distinct request body will fail" in bodies and "remembered" not in bodies
    assert (
        check_sampling(greedy, [{"logprobs": -3}, {"max_tokens": 3}], base={})
        == bodies + " (this check passed before: remembered)"
    )  # the same bodies, in another order
    # a refusal is re-checked (and re-explained) every time, never remembered
    for _ in range(2):
        with pytest.raises(UserError, match="refuses these settings: logprobs must be"):
            check_sampling(dict(greedy, logprobs=-3))
    assert len(list((tmp_path / "checks").iterdir())) == 3


def test_the_key_changes_with_the_installed_vllm_files(tmp_path, monkeypatch):
    """A reinstall rewrites vLLM's files (new size or mtime): the remembered verdict no
    longer applies. Checked on a copy of the files the key reads."""
    monkeypatch.setenv("HPC_INFER_CACHE", str(tmp_path / "cache"))
    real = Path(next(iter(importlib.util.find_spec("vllm").submodule_search_locations)))
    copy = tmp_path / "vllm"
    copy.mkdir()
    for name in ("sampling_params.py", "version.py", "_version.py"):
        if (real / name).exists():
            (copy / name).write_bytes((real / name).read_bytes())
    spec = types.SimpleNamespace(submodule_search_locations=[str(copy)])
    before = vllm_check._remembered(spec, {"max_tokens": 7}, None, None)
    assert before == vllm_check._remembered(spec, {"max_tokens": 7}, None, None)  # stable
    st = (copy / "sampling_params.py").stat()
    os.utime(copy / "sampling_params.py", ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert vllm_check._remembered(spec, {"max_tokens": 7}, None, None) != before
    assert vllm_check._remembered(spec, {"max_tokens": 8}, None, None) != before
