"""The shared compile cache (host/compile_cache.py): concurrent first starts never corrupt it.

Several real processes (on this machine, and as Slurm tasks on the local cluster's two
nodes) open the same shared cache at once, each "compiles" an entry of its own bytes
into its private VLLM_CACHE_ROOT and publishes it. Exactly one complete copy wins per
entry, nothing half-copied is ever visible under a published name, and later starts are
seeded with it. vLLM's CPU build runs eager (no torch.compile), so what vLLM itself writes
there is not exercised here; bench/engine_start.py --compile measures that.
"""

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_slurm

# One starter: open the cache, write an entry whose every file names this process (many
# files, so a mixed copy would show), wait until all starters are there, publish.
STARTER = r"""
import json, os, sys, time
from pathlib import Path
from hpc_infer.host.compile_cache import ENTRIES, open_cache
root, n, barrier = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
os.umask(0o077)
env = {}
use = open_cache(root, "org/Model-7B", 2, 1, env)
me = f"{os.environ.get('SLURMD_NODENAME', 'host')}-{os.getpid()}"
entry = Path(env["VLLM_CACHE_ROOT"]) / ENTRIES / "abc123" / "rank_0_0"
entry.mkdir(parents=True)
for i in range(200):
    (entry / f"f{i}").write_text(me * 50)
(barrier / me).touch()
while len(list(barrier.iterdir())) < n:
    time.sleep(0.01)
print(json.dumps({"me": me, "won": use.publish(), "seeded": use.seeded, "private": str(use.private)}))
"""


def _check_published(root: Path, results: list[dict]) -> Path:
    winners = [r for r in results if r["won"]]
    assert len(winners) == 1 and winners[0]["won"] == ["abc123"], results
    key = root / "org_Model-7B" / next(p.name for p in (root / "org_Model-7B").iterdir()) / "tp2-pp1"
    entries = key / "torch_compile_cache"
    assert [p.name for p in entries.iterdir()] == ["abc123"]  # no .incoming-* left behind
    files = sorted((entries / "abc123" / "rank_0_0").iterdir())
    assert len(files) == 200 and {f.read_text() for f in files} == {winners[0]["me"] * 50}  # one writer, whole
    for path in [key, entries, entries / "abc123"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path  # the writer's umask (a run's permissions)
    assert not any(Path(r["private"]).exists() for r in results)  # private copies removed at exit
    return entries


def _starters(tmp_path: Path, n: int, launcher: list[str]) -> list[dict]:
    barrier = tmp_path / "barrier"
    barrier.mkdir(exist_ok=True)
    for f in barrier.iterdir():
        f.unlink()
    p = subprocess.run(
        [*launcher, sys.executable, "-c", STARTER, str(tmp_path / "cc"), str(n), str(barrier)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return [json.loads(line) for line in p.stdout.splitlines()]


def test_concurrent_first_starts_publish_one_whole_copy_then_seed(tmp_path):
    (tmp_path / "b").mkdir()  # the barrier exists before any starter looks for it
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", STARTER, str(tmp_path / "cc"), "6", str(tmp_path / "b")],
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(6)
    ]
    results = [json.loads(p.communicate(timeout=300)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    entries = _check_published(tmp_path / "cc", results)
    # a killed publisher's half copy is hidden and never seeded; the next start is warm
    (entries / ".incoming-node9-1-abc999").mkdir()
    from hpc_infer.host.compile_cache import open_cache

    env = {}
    use = open_cache(str(tmp_path / "cc"), "org/Model-7B", 2, 1, env)
    assert use.seeded == ["abc123"] and env["VLLM_CACHE_ROOT"] == str(use.private)
    copied = sorted(p.name for p in (use.private / "torch_compile_cache" / "abc123" / "rank_0_0").iterdir())
    assert len(copied) == 200 and use.publish() == []  # nothing new: the shared copy is never rewritten
    other = open_cache(str(tmp_path / "cc"), "org/Model-7B", 1, 1, {})
    assert other.seeded == [] and other.shared != use.shared  # another layout: its own place


@pytest.mark.slurm
def test_concurrent_first_starts_on_two_slurm_nodes(tmp_path):
    require_slurm()
    results = _starters(
        tmp_path,
        4,
        [
            "srun",
            "--nodes=2",
            "--ntasks=4",
            "--cpus-per-task=1",
            "--mem=200M",
            f"--chdir={tmp_path}",
            f"--export=ALL,PYTHONPATH={Path(__file__).parent.parent}",
        ],
    )
    assert len(results) == 4 and len({r["me"].split("-")[0] for r in results}) == 2, results  # both nodes
    _check_published(tmp_path / "cc", results)


def test_relative_compile_cache_is_refused():
    from conftest import compose
    from hpc_infer.config import validate
    from hpc_infer.errors import UserError

    with pytest.raises(UserError, match="cluster.compile_cache: 'cc' is relative"):
        validate(compose("cluster=local", "cluster.compile_cache=cc"))
    validate(compose("cluster=local", "cluster.compile_cache=$TMPDIR/vllm-compile"))  # the node's own, expanded there


def test_only_entries_nobody_else_could_write_are_seeded(tmp_path):
    """An entry is compiled code the engine runs: one another user owns, one anyone could
    write, one holding a link (to a file of ours elsewhere) are skipped and named; ours is
    copied, byte for byte. Each folder and file is judged on its descriptor."""
    import os
    import shutil

    from hpc_infer.host.compile_cache import ENTRIES, key_dir, open_cache, vllm_version

    shared = key_dir(str(tmp_path / "cc"), "m", 1, 1, vllm_version()) / ENTRIES
    for name in ("ours", "foreign", "world", "linked"):
        (shared / name / "sub").mkdir(parents=True)
        (shared / name / "sub" / "kernel.py").write_text(f"# {name}\n")
    (shared / "world" / "sub" / "kernel.py").chmod(0o666)
    (shared / "linked" / "sub" / "more.py").symlink_to(tmp_path / "elsewhere.py")
    (tmp_path / "elsewhere.py").write_text("open('/tmp/EXECUTED', 'w')\n")
    if os.getuid() == 0:  # a real second user where there is one (CI runs as root)
        from test_trust import _user

        _user("mallory")
        shutil.chown(shared / "foreign" / "sub" / "kernel.py", "mallory")
    env: dict = {}
    use = open_cache(str(tmp_path / "cc"), "m", 1, 1, env)
    try:
        assert use.seeded == ["ours"] + ([] if os.getuid() == 0 else ["foreign"]), (use.seeded, use.problems)
        copied = Path(env["VLLM_CACHE_ROOT"]) / ENTRIES
        assert (copied / "ours" / "sub" / "kernel.py").read_text() == "# ours\n"
        assert not (copied / "world").exists() and not (copied / "linked").exists()
        text = " ".join(use.problems)
        assert "writable by everyone" in text and "symbolic link" in text, use.problems
        if os.getuid() == 0:
            assert "mallory" in text and not (copied / "foreign").exists()
    finally:
        shutil.rmtree(use.private, ignore_errors=True)
