"""A shared-file-system stand-in, as real as this machine allows (no kernel NFS here).

One backing folder (the file server's disk) seen through two FUSE client mounts
(`bindfs`), each with its own kernel attribute and directory-entry cache
(attr_timeout, entry_timeout, negative_timeout: a file one client created can stay
invisible to the other for seconds, a size or mtime stale, as NFS's attribute cache
does). `flock` on it is per client mount: a lock taken through one mount does not
exclude a holder through the other (NFS without NLM, Lustre mounted with -o localflock;
what hpc_infer must not rely on).

"node1" (this process, the launcher, the first Slurm node's jobs) sees the run through
mount A; "node2" (the second node's jobs, or a process started with HPC_INFER_NODE=node2)
sees the same paths through mount B, in a private mount namespace that binds B over A,
with its wall clock `skew_s` ahead: every Python process there reads time.time() (and
time_ns) that far off (a sitecustomize the wrapper puts on PYTHONPATH; libfaketime was
tried first, and breaks Python's sleeps when it leaves the monotonic clock alone), while
file times come from the file server as on a real node whose NTP is off. Both go through
`wrapper`, a command to put before `python` (cluster.python for Slurm jobs). Needs root
(mounts, namespaces) and bindfs (scripts/setup.sh installs it).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

CACHE_S = 3  # the clients' attribute/entry cache lifetime


def available() -> str | None:
    """Why the stand-in cannot run here, or None."""
    if shutil.which("bindfs") is None:
        return "bindfs is not installed"
    if not Path("/dev/fuse").exists():
        return "no /dev/fuse"
    return None


class SharedFS:
    def __init__(self, skew_s: float = 300.0, cache_s: int = CACHE_S):
        self.top = Path(tempfile.mkdtemp(prefix="hpc_infer-sharedfs-", dir="/tmp"))
        self.backing, self.a, self.b = self.top / "server", self.top / "node1", self.top / "node2"
        for d in (self.backing, self.a, self.b):
            d.mkdir()
        opts = f"attr_timeout={cache_s},entry_timeout={cache_s},negative_timeout={cache_s}"
        for mount in (self.a, self.b):
            subprocess.run(["bindfs", "-o", opts, str(self.backing), str(mount)], check=True)
        self.skew_s = skew_s
        skew_dir = self.top / "skew"
        skew_dir.mkdir()
        (skew_dir / "sitecustomize.py").write_text(
            "import os, time\n"
            "_s = float(os.environ.get('HPC_INFER_CLOCK_SKEW_S') or 0)\n"
            "if _s:\n"
            "    _t, _ns = time.time, time.time_ns\n"
            "    time.time = lambda: _t() + _s\n"
            "    time.time_ns = lambda: _ns() + int(_s * 1e9)\n"
        )
        self.wrapper = self.top / "node.sh"
        self.wrapper.write_text(f"""#!/bin/sh
# Run "$@" the way this node sees the shared file system (tests/sharedfs.py).
node=${{HPC_INFER_NODE:-$SLURMD_NODENAME}}
if [ "$node" = node2 ]; then
  exec unshare --mount --propagation private sh -c \\
    'mount --bind "$0" "$1" && shift && exec env PYTHONPATH="$0/../skew${{PYTHONPATH:+:$PYTHONPATH}}" HPC_INFER_CLOCK_SKEW_S={skew_s} "$@"' \\
    {self.b} {self.a} "$@"
fi
exec "$@"
""")
        self.wrapper.chmod(0o755)

    def on(self, node: str, argv: list[str]) -> list[str]:
        """argv run as `node` sees the file system (HPC_INFER_NODE in its environment)."""
        return ["env", f"HPC_INFER_NODE={node}", str(self.wrapper), *argv]

    def close(self) -> None:
        for mount in (self.a, self.b):
            for _ in range(50):
                if subprocess.run(["fusermount", "-u", str(mount)], capture_output=True).returncode == 0:
                    break
                time.sleep(0.2)  # busy: a process is still leaving it
        shutil.rmtree(self.top, ignore_errors=True)
