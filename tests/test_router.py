"""The router's parts that need no served model (the served router is tested in
tests/test_serve.py on the local Slurm): its key check and the job it is submitted as."""

import dataclasses
import urllib.error
import urllib.request

import pytest

from conftest import compose
from hpc_infer.serve.fleet import router_cluster, router_wanted
from hpc_infer.serve.router import KeyCheck


def _status(url: str, header: str | None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": header} if header else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_key_check_accepts_the_run_key_only():
    check = KeyCheck("s3cret-key")
    import threading

    threading.Thread(target=check.serve_forever, daemon=True).start()
    try:
        assert check.url.startswith("http://127.0.0.1:")
        assert _status(check.url, "Bearer s3cret-key") == 200
        assert _status(check.url, "bearer s3cret-key") == 200  # the scheme is case-insensitive (RFC 7235)
        for header in (None, "Bearer s3cret-ke", "Bearer s3cret-key2", "Basic s3cret-key", "s3cret-key", "Bearer "):
            assert _status(check.url, header) == 401, header
    finally:
        check.shutdown()


def test_router_job_is_the_replicas_cluster_without_gpus():
    rc = compose(
        "cluster=slurm_local",
        "cluster.gpus_per_task=2",
        "cluster.nodes_per_task=2",
        "cluster.qos=high",
        "serve.router_cpus=2",
        "serve.router_mem=3G",
    )
    spec = {
        "cluster_config": dataclasses.asdict(rc.cluster),
        "router_cpus": rc.serve.router_cpus,
        "router_mem": rc.serve.router_mem,
    }
    c = router_cluster(spec)
    assert (c.gpus_per_task, c.gres, c.nodes_per_task, c.cpus_per_task, c.mem) == (0, None, 1, 2, "3G")
    assert (c.partition, c.qos, c.time, c.backend) == (rc.cluster.partition, "high", rc.cluster.time, "slurm")


@pytest.mark.parametrize(
    "setting,replicas,expect", [(None, 1, False), (None, 2, True), (False, 4, False), (True, 1, True)]
)
def test_serve_router_on_by_default_above_one_replica(setting, replicas, expect):
    assert compose(f"serve.router={'null' if setting is None else str(setting).lower()}").serve.router is setting
    assert router_wanted({"router": setting}, replicas) is expect
