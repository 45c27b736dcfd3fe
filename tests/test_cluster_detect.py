"""`hpc-infer cluster detect` on the local 2-node Slurm (slurm/local-cluster.sh: a default
partition of both nodes, node2's GPUs typed l40s, a second partition `l40s` of node2 alone
with a 4-hour limit; no accounting database), through the console script; and its
parsers on the shapes other sites print."""

from __future__ import annotations

import pytest

from conftest import require_slurm, sh
from doc_commands import as_written
from hpc_infer.cluster.detect import expand_nodes, parse_gres


def test_gres_and_host_lists_as_sites_print_them():
    assert parse_gres("gpu:a100:4(S:0-1),shard:8") == {"a100": 4}
    assert parse_gres("gpu:4") == {"": 4} and parse_gres("(null)") == {}
    assert parse_gres("gpu:h100:4(S:0),gpu:a10:2(S:1)") == {"h100": 4, "a10": 2}
    assert expand_nodes("gpu[01-03,7],login1") == ["gpu01", "gpu02", "gpu03", "gpu7", "login1"]


@pytest.mark.slurm
def test_cluster_detect_reads_the_local_slurm_and_writes_a_config_that_works(tmp_path):
    require_slurm()
    fill = {"--config-dir conf": f"--config-dir {tmp_path}/conf"}
    p = sh(tmp_path, as_written("hpc-infer cluster detect mysite --config-dir conf", fill))  # the README's line
    assert p.returncode == 0, p.stderr
    text = (tmp_path / "conf" / "cluster" / "mysite.yaml").read_text()
    assert "partition: debug" in text  # the default partition
    assert "l40s: 1 node(s), l40s x4 on 1 node(s)" in text and "max time 04:00:00" in text  # the second one
    assert "untyped GPUs x4 on 1 node(s), l40s x4 on 1 node(s)" in text  # debug's nodes differ
    assert "max_array_size: " in text
    # no accounting database here: said, never guessed
    assert "account:" not in text and "the accounts and QOS you may charge" in text
    assert "not read" in p.stderr and "use it: hpc-infer launch --config-dir" in p.stderr
    again = sh(tmp_path, f"hpc-infer cluster detect mysite --config-dir {tmp_path}/conf")
    assert again.returncode == 2 and "--force" in again.stderr
    script = sh(
        tmp_path,
        f"hpc-infer sbatch --config-dir {tmp_path}/conf cluster=mysite cluster.gpus_per_task=0 "
        f"data.limit=2 output_root={tmp_path}/runs",
    )
    assert script.returncode == 0, script.stderr
    body = open(script.stdout.strip().splitlines()[-1]).read()
    assert "#SBATCH --partition=debug" in body


@pytest.mark.slurm
def test_the_readmes_doctor_line_names_what_would_fail_here(tmp_path):
    """The README's doctor line on the config detect wrote: this machine has the partition's
    GPUs only as placeholders (no driver) and no copy of Qwen2.5-Math: both fail, each with
    its fix, and doctor exits 1 before any run is planned."""
    require_slurm()
    fill = {"--config-dir conf": f"--config-dir {tmp_path}/conf"}
    assert sh(tmp_path, as_written("hpc-infer cluster detect mysite --config-dir conf", fill)).returncode == 0
    p = sh(tmp_path, as_written("hpc-infer doctor --config-dir conf cluster=mysite model=qwen_math", fill))
    assert p.returncode == 1, p.stdout + p.stderr
    rows = {line.split()[0]: line for line in p.stdout.splitlines()[1:] if line.strip()}
    assert "FAIL" in rows["model"] and "cache stage" in rows["model"]
    assert "FAIL" in rows["GPUs"] and "none visible" in rows["GPUs"]
    assert "the run would fail" in p.stderr and not (tmp_path / "runs" / "doctor__mysite" / "manifest.json").exists()
