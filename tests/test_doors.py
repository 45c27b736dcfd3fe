"""The doors of a run, discovered by an audit hook and attacked (tests/doors.py).

Each CI run attacks a seeded sample of the matrix (the seed is printed; HPC_INFER_DOORS_SEED
replays one); `-m doors_full` attacks all of it (run before a stop; the figures go in the
note). Real second users (mallory; team for group write); root is the victim, as in CI.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

import doors

pytestmark = pytest.mark.usefixtures("as_root")


@pytest.fixture(scope="module")
def site(cpu_model):
    if os.getuid() != 0:
        pytest.skip("needs root")  # as_root fails it in CI
    from test_trust import _user
    import subprocess

    if subprocess.run(["getent", "group", "team"], capture_output=True).returncode != 0:
        subprocess.run(["groupadd", "team"], check=True)
    _user("mallory")
    top = Path(tempfile.mkdtemp(prefix="hpc_infer-doors-", dir="/tmp"))
    s = doors.make_site(top)
    base = doors.plan_base(s)
    doors.plan_serve_base(s, cpu_model)
    doors.plan_sweep_base(s)
    doors.plan_cache_base(s)
    doors.plan_tune_base(s)
    yield s, base
    shutil.rmtree(top, ignore_errors=True)


def test_doors_are_discovered_for_every_command(site):
    s, _base = site
    every = ("launch", *doors.COMMANDS, "serve", *doors.SERVE_COMMANDS, "sweep", *doors.SWEEP_COMMANDS)
    for command in (*every, "cache", *doors.CACHE_COMMANDS, "tune-first", *doors.TUNE_COMMANDS):
        assert s.doors[command], f"{command}: the audit hook saw no run path"
    # every command reads the run's own description through some door
    assert {"manifest.json", "worker.json"} & set().union(*s.doors.values())
    for command in doors.SERVE_COMMANDS:  # and each serve command its serve.json and replica states
        assert {"serve.json", "serve/0.json"} <= s.doors[command], (command, s.doors[command])
    assert "runs.txt" in s.doors["sweep_report"] and "multirun.yaml" in s.doors["sweep_launch"], s.doors
    assert {"Tiny-One/config.json", "Tiny-One/model.safetensors"} <= s.doors["cache_verify"], s.doors
    store = "tuned/smollm2_cpu__local.yaml"  # the kept settings every launch applies, and the tune folder's result
    assert store in s.doors["tune_launch"] and "tune__smollm2_cpu__local/tune.json" in s.doors["tune"], s.doors
    print(
        "doors: "
        + ", ".join(f"{c} {len(d)}" for c, d in s.doors.items())
        + "; effects: "
        + ", ".join(f"{c} {e}" for c, e in s.effects.items())
    )


def _attack(site, cells) -> None:
    s, base = site
    verdicts = [v for k, cell in enumerate(cells) if (v := doors.check_one(s, base, k, *cell)) is not None]
    broken = [v.line() for v in verdicts if v.violations]
    refused = sum(1 for v in verdicts if v.rc == 2)
    print(
        f"attacked {len(verdicts)} (path, kind) cells: {refused} refused, {len(verdicts) - refused} ran; {len(broken)} broken"
    )
    assert not broken, "\n".join(broken)


def test_a_seeded_sample_of_every_door_times_every_attack(site):
    seed = int(os.environ.get("HPC_INFER_DOORS_SEED") or int.from_bytes(os.urandom(3), "big"))
    cells = doors.matrix(site[0])
    picked = doors.sample(cells, seed, 24)
    print(f"doors seed {seed} (HPC_INFER_DOORS_SEED={seed} replays it): {len(picked)} of {len(cells)} cells")
    _attack(site, picked)


@pytest.mark.doors_full
def test_the_whole_matrix(site):
    """HPC_INFER_DOORS_COMMANDS=tune,tune_launch (say) attacks those commands' cells only."""
    only = set(filter(None, os.environ.get("HPC_INFER_DOORS_COMMANDS", "").split(",")))
    _attack(site, [c for c in doors.matrix(site[0]) if not only or c[0] in only])
