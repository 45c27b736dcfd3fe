"""`hpc-infer cluster detect [NAME]`: read the site and write a commented cluster config.

Every site differs (partition names, GPU gres types and counts, the accounts and QOS a
user may charge, MaxArraySize, the longest time limit, a container runtime, the scratch
file system), and users otherwise learn them one failed job at a time. This reads what
Slurm says (`scontrol show config`, `scontrol show partition`, `scontrol show node`,
`sacctmgr show assoc` for the caller) and the login node (a container runtime on PATH,
the file system under the output root, /dev/shm), and writes `DIR/cluster/NAME.yaml`
for `hpc-infer launch --config-dir DIR cluster=NAME`. What it cannot read it leaves out
and says so in the file and on the terminal: it never guesses.
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from ..worker.probe import mount_of


@dataclass
class Partition:
    name: str
    default: bool
    max_time: str | None  # Slurm's text ("04:00:00", "2-00:00:00"); None: UNLIMITED
    default_time: str | None
    state: str
    nodes: list[str] = field(default_factory=list)
    gpus: dict[str, tuple[int, int]] = field(default_factory=dict)  # gres type ("" untyped) -> (nodes, fewest a node)
    gpu_nodes: int = 0  # nodes of it with any GPU
    cpus: int | None = None  # CPUs a node (the fewest)
    mem_mb: int | None = None  # memory a node, MiB (the least)
    qos: str | None = None  # the partition's own QOS
    allow_qos: str | None = None


@dataclass
class Site:
    cluster: str | None = None
    max_array_size: int | None = None
    partitions: list[Partition] = field(default_factory=list)
    accounts: list[str] | None = None
    qos: list[str] | None = None
    runtime: str | None = None
    fs: tuple[str, str] | None = None  # (mount point, type) under the output root
    shm_gb: float | None = None
    unread: list[str] = field(default_factory=list)  # what could not be read, and why


def _run(cmd: list[str], unread: list[str], what: str) -> str | None:
    if shutil.which(cmd[0]) is None:
        unread.append(f"{what}: `{cmd[0]}` is not on PATH")
        return None
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        unread.append(f"{what}: `{' '.join(cmd)}` did not answer in 30 s")
        return None
    if p.returncode != 0:
        first = (p.stderr or p.stdout).strip().splitlines()[:1]
        unread.append(f"{what}: `{' '.join(cmd)}` failed ({first[0] if first else p.returncode})")
        return None
    return p.stdout


def _fields(line: str) -> dict[str, str]:
    """`Key=Value Key2=Value with spaces` of `scontrol ... -o` (a value runs to the next Key=)."""
    out, key = {}, None
    for token in line.split():
        k, eq, v = token.partition("=")
        if eq and re.fullmatch(r"[A-Za-z][A-Za-z0-9_/:.]*", k):
            key, out[k] = k, v
        elif key:
            out[key] += " " + token
    return out


def parse_gres(text: str) -> dict[str, int]:
    """`gpu:4`, `gpu:a100:4(S:0-1)`, `gpu:l40s:2,shard:8` -> {type: count} of GPUs."""
    found: dict[str, int] = {}
    for part in re.split(r",(?![^()]*\))", text or ""):
        bits = re.sub(r"\(.*\)", "", part).split(":")
        if bits[0] != "gpu" or len(bits) < 2:
            continue
        kind, count = ("", bits[1]) if len(bits) == 2 else (bits[1], bits[2])
        if count.isdigit():
            found[kind] = found.get(kind, 0) + int(count)
    return found


def expand_nodes(text: str) -> list[str]:
    """Slurm's host list (`node[1-3,5],gpu7`), expanded."""
    out = []
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", text or ""):
        m = re.fullmatch(r"(.*)\[([^\]]*)\](.*)", item)
        if not m:
            out.append(item)
            continue
        for rng in m.group(2).split(","):
            lo, _, hi = rng.partition("-")
            width = len(lo)
            for n in range(int(lo), int(hi or lo) + 1):
                out.append(f"{m.group(1)}{n:0{width}d}{m.group(3)}")
    return [n for n in out if n and n != "(null)"]


def read_site(output_root: Path) -> Site:
    site = Site()
    u = site.unread
    config = _run(["scontrol", "show", "config"], u, "MaxArraySize and the cluster's name")
    if config is not None:
        conf = dict(re.findall(r"^(\w+)\s*=\s*(.*?)\s*$", config, re.M))
        site.cluster = conf.get("ClusterName")
        if (conf.get("MaxArraySize") or "").isdigit():
            site.max_array_size = int(conf["MaxArraySize"])
    nodes: dict[str, dict[str, str]] = {}
    node_text = _run(["scontrol", "show", "node", "-o"], u, "GPUs, CPUs and memory of the nodes")
    for line in (node_text or "").splitlines():
        f = _fields(line)
        if f.get("NodeName"):
            nodes[f["NodeName"]] = f
    part_text = _run(["scontrol", "show", "partition", "-o"], u, "partitions and their time limits")
    for line in (part_text or "").splitlines():
        f = _fields(line)
        if not f.get("PartitionName"):
            continue
        names = expand_nodes(f.get("Nodes", ""))
        part = Partition(
            name=f["PartitionName"],
            default=f.get("Default") == "YES",
            max_time=None if f.get("MaxTime") in (None, "UNLIMITED") else f["MaxTime"],
            default_time=None if f.get("DefaultTime") in (None, "NONE", "UNLIMITED") else f["DefaultTime"],
            state=f.get("State", "?"),
            nodes=names,
            qos=None if f.get("QoS") in (None, "N/A") else f["QoS"],
            allow_qos=None if f.get("AllowQos") in (None, "ALL") else f["AllowQos"],
        )
        seen = [nodes[n] for n in names if n in nodes]
        if seen:
            kinds: dict[str, list[int]] = {}
            for n in seen:
                gres = parse_gres(n.get("Gres", ""))
                part.gpu_nodes += bool(gres)
                for kind, count in gres.items():
                    kinds.setdefault(kind, []).append(count)
            part.gpus = {k: (len(v), min(v)) for k, v in kinds.items()}
            cpus = [int(n["CPUTot"]) for n in seen if n.get("CPUTot", "").isdigit()]
            mem = [int(n["RealMemory"]) for n in seen if n.get("RealMemory", "").isdigit()]
            part.cpus, part.mem_mb = (min(cpus) if cpus else None), (min(mem) if mem else None)
        site.partitions.append(part)
    assoc = _run(
        ["sacctmgr", "-nP", "show", "assoc", f"user={getpass.getuser()}", "format=account,qos"],
        u,
        "the accounts and QOS you may charge",
    )
    if assoc is not None:
        rows = [line.split("|") for line in assoc.splitlines() if line.strip()]
        site.accounts = sorted({r[0] for r in rows if r and r[0]})
        site.qos = sorted({q for r in rows if len(r) > 1 for q in r[1].split(",") if q})
    site.runtime = next((r for r in ("apptainer", "singularity") if shutil.which(r)), None)
    if site.runtime is None:
        u.append("a container runtime: neither apptainer nor singularity is on PATH here")
    probe = output_root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    site.fs = mount_of(probe)
    if site.fs is None:
        u.append(f"the file system under {output_root}: /proc/mounts unreadable")
    try:
        st = os.statvfs("/dev/shm")
        site.shm_gb = st.f_blocks * st.f_frsize / 2**30
    except OSError:
        u.append("/dev/shm: not there on this node")
    return site


SHARED_FS = {"nfs", "nfs4", "lustre", "gpfs", "beegfs", "cephfs", "ceph", "fuse.glusterfs", "wekafs", "panfs"}


def _gres_text(gpus: dict[str, tuple[int, int]]) -> str:
    return ", ".join(f"{k or 'untyped GPUs'} x{c} on {n} node(s)" for k, (n, c) in sorted(gpus.items())) or "no GPUs"


def render(name: str, site: Site, output_root: Path) -> str:
    """The commented YAML: what was read, as settings; the rest, as comments."""
    lines = [
        f"# Written by `hpc-infer cluster detect {name}` on {socket.gethostname()} at "
        f"{time.strftime('%Y-%m-%d %H:%M')} from scontrol, sacctmgr and this login node.",
        "# Check it, then: hpc-infer launch --config-dir DIR cluster=" + name,
        "defaults: [/cluster_schema@_here_, _self_]",
        f"name: {name}",
        "backend: slurm",
    ]
    default = next((p for p in site.partitions if p.default), None)
    if site.partitions:
        lines.append("# partitions (GPUs a node; the fewest where nodes differ):")
        for p in site.partitions:
            mem = f", {p.mem_mb // 1024}G" if p.mem_mb else ""
            lines.append(
                f"#   {p.name}{' (default)' if p.default else ''}: {len(p.nodes)} node(s), {_gres_text(p.gpus)}, "
                f"{p.cpus or '?'} CPUs{mem} a node, max time {p.max_time or 'unlimited'}, {p.state.lower()}"
            )
    if default:
        lines.append(f"partition: {default.name}          # the default partition; pick another above")
        gpus = default.gpus
        if gpus and default.gpu_nodes == len(default.nodes):
            lines.append("gpus_per_task: 1")
            if len(gpus) == 1 and sorted(gpus)[0]:
                lines.append(f'gres: "gpu:{sorted(gpus)[0]}:1"        # the one GPU type of this partition')
            elif len(gpus) > 1:
                lines.append(
                    f"# GPU types differ between its nodes ({', '.join(k or 'untyped' for k in sorted(gpus))}):"
                )
                lines.append('#   to ask for one, gres: "gpu:TYPE:1"')
        elif gpus:
            lines.append(
                f"gpus_per_task: 1             # only {default.gpu_nodes} of its {len(default.nodes)} nodes have GPUs"
            )
        else:
            lines.append("gpus_per_task: 0             # no GPU gres on this partition's nodes")
        if default.cpus:
            lines.append(f"cpus_per_task: {min(8, default.cpus)}")
        if default.mem_mb:
            lines.append(
                f"mem: {min(40, max(1, default.mem_mb * 9 // 10 // 1024))}G   # of {default.mem_mb // 1024}G a node"
            )
        if default.max_time:
            lines.append(f'time: "{default.max_time}"   # the partition\'s longest')
        elif default.default_time:
            lines.append(f'time: "{default.default_time}"   # the partition\'s default (no maximum set)')
        else:
            lines.append("# time: no limit on this partition: cluster.time stays at its default (04:00:00)")
        if default.qos:
            lines.append(f"# the partition's own QOS: {default.qos}")
    elif site.partitions:
        lines.append("# no default partition: set `partition:` to one above")
    if site.max_array_size:
        lines.append(f"max_array_size: {site.max_array_size}")
    if site.accounts:
        lines.append(
            f"account: {site.accounts[0]}"
            + (f"   # you may also charge: {', '.join(site.accounts[1:])}" if site.accounts[1:] else "")
        )
    if site.qos:
        lines.append(f"# QOS you may use: {', '.join(site.qos)} (set qos: to one)")
    if site.runtime:
        lines += [
            "container:",
            f"  runtime: {site.runtime}",
            "  # image: /path/to/vllm.sif   (hpc-infer image pull docker://vllm/vllm-openai:...)",
        ]
    if site.fs:
        mount, kind = site.fs
        verdict = (
            "shared: fine for run directories"
            if kind in SHARED_FS
            else "node-local or unknown: not seen by other nodes"
        )
        lines.append(f"# {output_root} is on {mount} ({kind}): {verdict}")
    if site.shm_gb is not None:
        lines.append(
            f"# /dev/shm here: {site.shm_gb:.1f} GiB (tensor parallelism needs room there on the GPU nodes: hpc-infer doctor)"
        )
    if site.unread:
        lines.append("# not read (set these yourself if they matter):")
        lines += [f"#   {u}" for u in site.unread]
    return "\n".join(lines) + "\n"


def detect(name: str, config_dir: Path, output_root: Path, force: bool = False) -> tuple[Path, Site]:
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise UserError(f"cluster detect: {name!r} is not a config name (letters, digits, _ . -)")
    target = config_dir.expanduser() / "cluster" / f"{name}.yaml"
    if target.exists() and not force:
        raise UserError(f"cluster detect: {target} exists; pass --force to replace it, or give another name")
    site = read_site(output_root.expanduser())
    if not site.partitions and not site.cluster:
        raise UserError(
            "cluster detect: Slurm did not answer here (" + "; ".join(site.unread[:2]) + "); run it on a login "
            "node of the cluster, where sinfo works"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    from ..rundir import write_atomic

    write_atomic(target, render(name, site, output_root.expanduser()).encode())
    return target, site
