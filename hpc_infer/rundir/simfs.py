"""A simulated shared file server and its clients, behind the same `Dir` interface as the
real pinned handle (rundir/fsio.py), for the seeded simulator of the run-directory
protocol (tests/simulation.py) and the metadata-cost bench (bench/metadata_sim.py).

What it models, each a thing an NFS/Lustre client does to the protocol:

- the server's clock sets every mtime (`SimServer.now`); nodes' clocks are the simulator's;
- per client, an attribute cache and a directory-listing cache of configurable staleness
  (`ac_s`): `stat` and `listdir` may show a file that is gone, miss one that is new, or an
  old size and mtime, for up to `ac_s` after the change (a rename seen late by others).
  An open (`read`, `read_stat`, `read_at`) revalidates, as close-to-open consistency does;
  a client's own changes update its own cache;
- faults, each at a rate per call, drawn from the seeded generator: `EIO` and `ESTALE` on
  reads (a file replaced under a reader), `ENOSPC` on writes, and a `link` whose reply is
  lost: the link is made, and the client's retry fails with `EEXIST` on it;
- a count of every namespace call by kind (`SimServer.calls`): the metadata cost.

Standard library only."""

from __future__ import annotations

import collections
import errno
import random
from dataclasses import dataclass, field

from . import faults
from .fsio import Dir, Stat, link_won, split_name


DIRENTS_PER_CALL = 1000  # names one getdents64 returns into glibc's 32 KiB buffer (ours are ~32 bytes
# each); what strace counts. An NFS READDIRPLUS reply of 32 KiB carries about a fifth as many.


@dataclass
class Node:
    """An inode: a file's bytes or a folder's entries."""

    ino: int
    is_dir: bool
    mtime: float
    data: bytes = b""
    entries: dict[str, int] = field(default_factory=dict)
    nlink: int = 1
    listing: list[str] | None = None  # the names sorted, kept until the folder changes (CPU at scale)

    def changed(self, now: float) -> None:
        self.mtime, self.listing = now, None


@dataclass
class Faults:
    """Rates per call (0..1) of what a shared file server does wrong."""

    eio: float = 0.0  # reads and writes
    estale: float = 0.0  # reads of a file replaced since the client last looked
    enospc: float = 0.0  # writes
    link_lost: float = 0.0  # links made whose reply is lost (the retry sees EEXIST)


class SimServer:
    """One file server: inodes, a clock, counters. Not thread-safe: the simulator is one thread."""

    def __init__(self, now=lambda: 0.0, rng: random.Random | None = None, faults: Faults | None = None):
        self.now, self.rng, self.faults = now, rng or random.Random(0), faults or Faults()
        self.nodes: dict[int, Node] = {1: Node(1, True, 0.0, nlink=2)}
        self._next = 2
        self.calls: collections.Counter = collections.Counter()

    def _new(self, is_dir: bool, data: bytes = b"") -> Node:
        n = Node(self._next, is_dir, self.now(), data)
        self.nodes[n.ino] = n
        self._next += 1
        return n

    def lookup(self, parts: list[str], create_dirs: bool = False) -> Node:
        node = self.nodes[1]
        for p in parts:
            if not node.is_dir:
                raise NotADirectoryError(errno.ENOTDIR, "not a folder", "/".join(parts))
            ino = node.entries.get(p)
            if ino is None:
                if not create_dirs:
                    raise FileNotFoundError(errno.ENOENT, "no such file", "/".join(parts))
                child = self._new(True)
                node.entries[p] = child.ino
                node.changed(self.now())
                ino = child.ino
            node = self.nodes[ino]
        return node

    def put_tree(self, files: dict[str, bytes]) -> None:
        """Files (relative paths) as they are, folders made as needed: a planned run."""
        for name, data in files.items():
            folder, base = split_name(name)
            d = self.lookup([p for p in folder.split("/") if p], create_dirs=True)
            d.entries[base] = self._new(False, data).ino
            d.listing = None

    def _unref(self, ino: int) -> None:
        """One name less; a file with none is gone (a reader in the simulator reads at once,
        so none holds it open): its bytes are freed, as 10,000 workers' beats need."""
        n = self.nodes[ino]
        n.nlink -= 1
        if n.nlink <= 0 and not n.is_dir:
            del self.nodes[ino]


class SimClient(Dir):
    """One node's mount of a folder on the server, with its own caches."""

    def __init__(self, server: SimServer, root: str, tag: str, ac_s: float = 0.0, path: str | None = None):
        self.server, self.root, self._tag, self.ac_s = server, [p for p in root.split("/") if p], tag, ac_s
        self.path = path or "/sim/" + root
        self._attr: dict[str, tuple[float, Stat | None]] = {}  # name -> (when cached, stat or None)
        self._list: dict[str, tuple[float, list[str]]] = {}
        self._seen_ino: dict[str, int] = {}  # the inode this client last opened under a name
        self.down = False  # the mount does not answer: every call that reaches the server fails

    # --- helpers ------------------------------------------------------------------------------
    def client_now(self) -> float:
        from . import clock

        return clock.now()

    def _parts(self, name: str) -> list[str]:
        if not name:
            return list(self.root)
        folder, base = split_name(name)
        return self.root + [p for p in folder.split("/") if p] + [base]

    def _node(self, name: str) -> Node:
        return self.server.lookup(self._parts(name))

    def _count(self, op: str) -> None:
        if self.down:
            raise OSError(errno.EIO, "injected: the mount does not answer", self.path)
        self.server.calls[op] += 1

    def _fault(self, kind: str, name: str) -> None:
        f, rng = self.server.faults, self.server.rng
        if kind == "read" and f.eio and rng.random() < f.eio:
            raise OSError(errno.EIO, "injected EIO", self.where(name))
        if kind == "write" and f.enospc and rng.random() < f.enospc:
            raise OSError(errno.ENOSPC, "injected ENOSPC", self.where(name))
        if kind == "write" and f.eio and rng.random() < f.eio:
            raise OSError(errno.EIO, "injected EIO", self.where(name))

    def _forget(self, name: str) -> None:
        folder = split_name(name)[0] if name else ""
        self._attr.pop(name, None)
        self._list.pop(folder, None)

    @staticmethod
    def _stat_of(n: Node) -> Stat:
        return Stat(n.mtime, len(n.data), n.nlink, n.ino, 0, 0, 0o40700 if n.is_dir else 0o100600)

    # --- reads --------------------------------------------------------------------------------
    def _open(self, name: str) -> Node:
        self._count("open")
        self._fault("read", name)
        n = self._node(name)
        if n.is_dir:
            raise IsADirectoryError(errno.EISDIR, "a folder", self.where(name))
        last = self._seen_ino.get(name)
        f = self.server.faults
        if last is not None and last != n.ino and f.estale and self.server.rng.random() < f.estale:
            self._seen_ino.pop(name, None)
            raise OSError(errno.ESTALE, "injected ESTALE: replaced under this reader", self.where(name))
        if f.estale:
            self._seen_ino[name] = n.ino
        if self.ac_s > 0:  # (with no cache, nothing kept: 10,000 clients in one process)
            self._attr[name] = (self.server.now(), self._stat_of(n))  # close-to-open: fresh attributes
        return n

    def read(self, name: str) -> bytes:
        return self._open(name).data

    def read_stat(self, name: str) -> tuple[bytes, Stat]:
        n = self._open(name)
        return n.data, self._stat_of(n)

    def read_at(self, name: str, offset: int, n: int) -> bytes:
        return self._open(name).data[offset : offset + n]

    def read_ranges(self, name: str, ranges: list[tuple[int, int]]) -> list[bytes]:
        data = self._open(name).data
        return [data[a : a + n] for a, n in ranges]

    def stat(self, name: str = "") -> Stat | None:
        now = self.server.now()
        hit = self._attr.get(name)
        if hit is not None and now - hit[0] <= self.ac_s:
            return hit[1]
        self._count("stat")
        try:
            st: Stat | None = self._stat_of(self._node(name))
        except (FileNotFoundError, NotADirectoryError):
            st = None
        if self.ac_s > 0:
            self._attr[name] = (now, st)
        return st

    def listdir(self, sub: str = "") -> list[str]:
        now = self.server.now()
        hit = self._list.get(sub)
        if hit is not None and now - hit[0] <= self.ac_s:
            return list(hit[1])
        self._count("readdir")
        try:
            n = self.server.lookup(self.root + [p for p in sub.split("/") if p]) if sub else self._node("")
            if n.is_dir and n.listing is None:
                n.listing = sorted(n.entries)
            names = n.listing if n.is_dir else []
        except (FileNotFoundError, NotADirectoryError):
            names = []
        self.server.calls["readdir"] += len(names) // DIRENTS_PER_CALL  # a long folder is several calls
        if self.ac_s > 0:
            self._list[sub] = (now, names)
        return list(names)

    # --- writes -------------------------------------------------------------------------------
    def _folder(self, name: str) -> tuple[Node, str]:
        folder, base = split_name(name)
        d = self.server.lookup(self.root + [p for p in folder.split("/") if p])
        if not d.is_dir:
            raise NotADirectoryError(errno.ENOTDIR, "not a folder", self.where(name))
        return d, base

    def _place(self, name: str, node: Node, exclusive: bool) -> bool:
        d, base = self._folder(name)
        old = d.entries.get(base)
        if old is not None and exclusive:
            return False
        if old is not None:
            self.server._unref(old)
        d.entries[base] = node.ino
        d.changed(self.server.now())
        self._forget(name)
        return True

    def create(self, name: str, data: bytes, private: bool = False) -> bool:
        self._count("create")
        self._fault("write", name)
        d, base = self._folder(name)
        if base in d.entries:
            self._forget(name)
            return False
        return self._place(name, self.server._new(False, data), True)

    def append(self, name: str, data: bytes) -> None:
        self._count("open")
        self._fault("write", name)
        d, base = self._folder(name)
        ino = d.entries.get(base)
        if ino is None:
            self._place(name, self.server._new(False, data), True)
        else:
            node = self.server.nodes[ino]
            node.data += data
            node.mtime = self.server.now()
            self._forget(name)

    def replace(self, name: str, data: bytes) -> None:
        self._count("create")  # the temp file
        self._fault("write", name)
        self._folder(name)
        faults.point("tmp_written", self.where(name))
        self._count("rename")
        self._place(name, self.server._new(False, data), False)
        faults.point("renamed", self.where(name))

    def publish(self, name: str, data: bytes) -> bool:
        self._count("create")
        self._fault("write", name)
        self._folder(name)
        node = self.server._new(False, data)  # the temp file: its one name
        faults.point("tmp_written", self.where(name))

        def links() -> int:
            self._count("stat")
            return node.nlink

        won = link_won(lambda: self._link(node, name), links)
        faults.point("renamed", self.where(name))
        self._count("unlink")
        node.nlink -= 1
        if node.nlink <= 0:
            del self.server.nodes[node.ino]  # the temp file's only name is gone
        return won

    def _link(self, node: Node, dst: str) -> None:
        """One more name for `node`, if `dst` is free; a lost reply's retry fails on the link made."""
        self._count("link")
        if not self._place(dst, node, True):
            raise FileExistsError(errno.EEXIST, "exists", self.where(dst))
        node.nlink += 1
        f = self.server.faults
        if f.link_lost and self.server.rng.random() < f.link_lost:
            self._count("link")  # the retry
            raise FileExistsError(errno.EEXIST, "exists (injected: the first link's reply was lost)", self.where(dst))

    def rename(self, src: str, dst: str) -> None:
        self._count("rename")
        sd, sb = self._folder(src)
        if sb not in sd.entries:
            self._forget(src)
            raise FileNotFoundError(errno.ENOENT, "no such file", self.where(src))
        ino = sd.entries.pop(sb)
        sd.changed(self.server.now())
        self._place(dst, self.server.nodes[ino], False)
        self._forget(src)

    def link(self, src: str, dst: str) -> None:
        self._link(self._node(src), dst)

    def unlink(self, name: str) -> None:
        self._count("unlink")
        d, base = self._folder(name)
        if base not in d.entries:
            self._forget(name)
            raise FileNotFoundError(errno.ENOENT, "no such file", self.where(name))
        self.server._unref(d.entries.pop(base))
        d.changed(self.server.now())
        self._forget(name)

    def touch(self, name: str) -> None:
        self._count("setattr")
        self._fault("write", name)
        d, base = self._folder(name)
        ino = d.entries.get(base)
        if ino is None:
            self._place(name, self.server._new(False), True)
        else:
            self.server.nodes[ino].mtime = self.server.now()
            self._forget(name)

    def mkdir(self, name: str) -> None:
        folder, base = split_name(name)
        if folder and self.stat(folder) is None:
            self.mkdir(folder)
        self._count("mkdir")
        d, base = self._folder(name)
        if base not in d.entries:
            self._place(name, self.server._new(True), True)

    def rmtree(self, name: str) -> None:
        self._count("rmdir")
        d, base = self._folder(name)
        d.entries.pop(base, None)
        d.changed(self.server.now())
        self._forget(name)
        for key in [k for k in self._attr if k.startswith(name + "/")]:
            self._attr.pop(key)
