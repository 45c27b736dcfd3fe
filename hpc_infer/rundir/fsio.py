"""The run directory's I/O behind one pinned handle: every protocol step (claims, leases,
chunk inputs and outputs, attempts, heartbeats, listings) reads and writes through a `Dir`,
never through a path re-resolved later.

Two implementations share the interface:

- `PinnedDir`, the real one: the directory is opened once (`O_DIRECTORY|O_NOFOLLOW`, every
  component of its resolved path walked without following a link), judged on the open
  descriptor (`fstat` and its POSIX ACLs: rundir/trust.py), and every file and folder in it
  is opened relative to that descriptor (`dir_fd`, `O_NOFOLLOW`). A name is relative and
  stays inside: no `..`, no absolute path, no empty part. Whoever can write a parent folder
  can rename the run away, but not change what this handle points to; the run's identity
  (`Pin`: its inode number as the file server reports it, and the random `run_id` only its
  owner can read) travels with its jobs, and a process that opens the run by path again
  checks it (`check_pin`).
- `rundir/simfs.py`, a simulated file server with per-client caches and faults, for the
  seeded simulator of the protocol (tests/simulation.py).

Standard library only: workers import it inside the cluster's image.
"""

from __future__ import annotations

import errno
import io
import os
import secrets
import shutil
import socket
import stat as stat_mod
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator, NamedTuple

from ..errors import DamagedFile
from . import clock, faults

RUN_ID = "run_id"  # a random id, mode 0600: the run's identity, readable by its owner alone
PIN_ENV = "HPC_INFER_RUN_PIN"  # "INODE:RUN_ID", given to every job of the run


class Stat(NamedTuple):
    mtime: float  # set by the file server: ages are measured against its clock (rundir/lease.py)
    size: int
    nlink: int
    ino: int
    uid: int
    gid: int
    mode: int

    @staticmethod
    def of(st: os.stat_result) -> "Stat":
        return Stat(st.st_mtime, st.st_size, st.st_nlink, st.st_ino, st.st_uid, st.st_gid, st.st_mode)


@dataclass(frozen=True)
class Pin:
    """A run's identity: what a swapped-in directory cannot copy."""

    ino: int
    run_id: str

    def encode(self) -> str:
        return f"{self.ino}:{self.run_id}"

    @staticmethod
    def decode(text: str) -> "Pin | None":
        ino, _, rid = (text or "").partition(":")
        return Pin(int(ino), rid) if ino.isdigit() and rid.isalnum() else None


def split_name(name: str) -> tuple[str, str]:
    """(folder, base) of a relative name inside a Dir; refuses anything that could leave it."""
    parts = name.split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\0" in name:
        raise ValueError(f"{name!r} is not a plain relative name inside the directory")
    return "/".join(parts[:-1]), parts[-1]


def link_won(link: Callable[[], None], links_of_temp: Callable[[], int]) -> bool:
    """Whether our temp file's hard link made the name. A failed link() is not the answer on
    NFS: a LINK whose reply was lost is sent again, and the retry fails (EEXIST) on the link
    the first one made. So any failure is judged by the temp file's link count, as open(2)
    advises for lock files on NFS: 2 means the name is ours."""
    try:
        link()
        return True
    except OSError:
        return links_of_temp() == 2


def check_name(name: str) -> str:
    """A path found inside a file (a sweep's run list, a summary's file names): relative and
    staying inside its directory, else ValueError."""
    split_name(name)
    return name


def fd_path(fd: int) -> str:
    """The path of an open descriptor (/proc/self/fd/N): what it names when it was opened,
    whatever has been renamed or replaced since. For libraries that take only paths."""
    return f"/proc/self/fd/{fd}"


class Dir:
    """One directory and everything under it, by relative names. Missing files raise
    FileNotFoundError (stat returns None, listdir []), as the os calls do."""

    path: str  # for messages and failpoints only, never re-opened
    _tag: str | None = None

    @property
    def tag(self) -> str:
        """This client's name (its clock probe file): host and process, or the simulator's."""
        return self._tag or f"{socket.gethostname()}-{os.getpid()}"

    def client_now(self) -> float:
        """This node's own clock: only where the file server's cannot be had."""
        return clock.now()

    def read(self, name: str) -> bytes:
        raise NotImplementedError

    def read_stat(self, name: str) -> tuple[bytes, Stat]:
        """A file's bytes and its attributes, from one open."""
        raise NotImplementedError

    def read_at(self, name: str, offset: int, n: int) -> bytes:
        raise NotImplementedError

    def read_ranges(self, name: str, ranges: list[tuple[int, int]]) -> list[bytes]:
        """(offset, length) ranges of one file, from one open."""
        return [self.read_at(name, a, n) for a, n in ranges]

    def stat(self, name: str = "") -> Stat | None:
        raise NotImplementedError

    def listdir(self, sub: str = "") -> list[str]:
        raise NotImplementedError

    def create(self, name: str, data: bytes, private: bool = False) -> bool:
        """O_CREAT|O_EXCL: True when this call made the file (claims, markers, locks);
        `private`: mode 0600 whatever the run's permissions."""
        raise NotImplementedError

    def replace(self, name: str, data: bytes) -> None:
        """Whole or not at all: a temp file in the same folder, synced, renamed over `name`."""
        raise NotImplementedError

    @contextmanager
    def writing(self, name: str, written: str = "tmp_written", renamed: str = "renamed") -> Iterator[BinaryIO]:
        """replace() for a file written as a stream (a merge's results): a temp file in the
        same folder, synced, renamed over `name` when the block ends; removed on an error."""
        buf = io.BytesIO()
        yield buf
        self.replace(name, buf.getvalue())

    def fd_path(self) -> str:
        """A path naming this folder itself (PinnedDir: its descriptor's); the simulator's has none."""
        raise NotImplementedError

    def append(self, name: str, data: bytes) -> None:
        """`data` added at the end of a regular file (created if missing), never through a
        link: a list several processes add lines to (a sweep's runs.txt)."""
        raise NotImplementedError

    def publish(self, name: str, data: bytes) -> bool:
        """Only if nothing is there: a synced temp file hard-linked to `name` (one copy wins;
        whether ours did is judged by `link_won`, never by link()'s error alone)."""
        raise NotImplementedError

    def rename(self, src: str, dst: str) -> None:
        raise NotImplementedError

    def link(self, src: str, dst: str) -> None:
        raise NotImplementedError

    def unlink(self, name: str) -> None:
        raise NotImplementedError

    def touch(self, name: str) -> None:
        """The file's mtime set to the file server's now (created if missing)."""
        raise NotImplementedError

    def mkdir(self, name: str) -> None:
        """A folder (and its parents), if missing."""
        raise NotImplementedError

    def rmtree(self, name: str) -> None:
        raise NotImplementedError

    def exists(self, name: str = "") -> bool:
        return self.stat(name) is not None

    def where(self, name: str = "") -> str:
        return f"{self.path}/{name}" if name else self.path

    def close(self) -> None:
        pass


_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_O_PATHDIR = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def open_walked(path: str) -> tuple[int, list[tuple[str, os.stat_result]]]:
    """A descriptor of the directory at `path` (resolved once), reached from / one component
    at a time without following a link, and each ancestor's (path, stat) on the way."""
    real = os.path.realpath(path)
    fd = os.open("/", _O_PATHDIR)
    walked: list[tuple[str, os.stat_result]] = [("/", os.fstat(fd))]
    here = ""
    parts = [p for p in real.split("/") if p]
    try:
        for k, part in enumerate(parts):
            last = k == len(parts) - 1
            nfd = os.open(part, _O_DIR if last else _O_PATHDIR, dir_fd=fd)
            os.close(fd)
            fd = nfd
            here += "/" + part
            if not last:
                walked.append((here, os.fstat(fd)))
        if not parts:
            os.close(fd)
            fd = os.open("/", _O_DIR)
    except BaseException:
        os.close(fd)
        raise
    return fd, walked


class PinnedDir(Dir):
    """The real handle. `judge(fd, what_path)` is called on every folder opened (the root
    and each sub-folder) and on every file opened for reading, on the descriptor:
    rundir/trust.py passes the trust rule. A file in a run we own that another user (or a
    group, or an ACL entry) could write is refused like such a folder: a door that reads it
    never has to remember to ask."""

    def __init__(self, path: str | os.PathLike, judge=None):
        self.path = os.fspath(path)
        self._judge = judge
        self._fds: dict[str, int] = {}  # (a walk that fails leaves nothing for __del__ to close)
        self.root_fd, self.ancestors = open_walked(self.path)
        self._fds = {"": self.root_fd}
        try:
            if judge:
                judge(self.root_fd, self.path)
        except BaseException:
            self.close()
            raise

    # --- folders ------------------------------------------------------------------------------
    def _dir(self, folder: str) -> int:
        fd = self._fds.get(folder)
        if fd is not None:
            return fd
        parent, base = folder.rpartition("/")[0], folder.rpartition("/")[2]
        pfd = self._dir(parent)
        fd = os.open(base, _O_DIR, dir_fd=pfd)
        try:
            if self._judge:
                self._judge(fd, self.where(folder))
        except BaseException:
            os.close(fd)
            raise
        self._fds[folder] = fd
        return fd

    def _evict(self, folder: str) -> bool:
        """A cached folder that was removed (rmtree of a part folder, then made again)."""
        fd = self._fds.get(folder)
        if not folder or fd is None:
            return False
        try:
            gone = os.fstat(fd).st_nlink == 0
        except OSError:
            gone = True
        if gone:
            for key in [k for k in self._fds if k == folder or k.startswith(folder + "/")]:
                os.close(self._fds.pop(key))
        return gone

    def _at(self, name: str, op):
        folder, base = split_name(name)
        try:
            return op(self._dir(folder), base)
        except FileNotFoundError:
            if self._evict(folder):
                return op(self._dir(folder), base)
            raise

    # --- reads --------------------------------------------------------------------------------
    def open_file(self, name: str) -> int:
        """A read-only descriptor of a regular file in here, not a link."""

        def op(d: int, base: str) -> int:
            try:
                fd = os.open(base, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), dir_fd=d)
            except OSError as e:
                if e.errno == errno.ELOOP:  # a link planted in a run file's place: refused, named
                    raise DamagedFile(
                        f"{self.where(name)}: a symbolic link where the run keeps a file of its own; hpc_infer "
                        f"never follows one. Someone else may have written into this run: plan it again "
                        f"under a new run_name=..."
                    ) from None
                raise
            try:
                if not stat_mod.S_ISREG(os.fstat(fd).st_mode):
                    raise DamagedFile(f"{self.where(name)}: not a regular file where the run keeps one")
                if self._judge:
                    self._judge(fd, self.where(name))
            except BaseException:
                os.close(fd)
                raise
            return fd

        return self._at(name, op)

    def read(self, name: str) -> bytes:
        fd = self.open_file(name)
        with os.fdopen(fd, "rb") as f:
            return f.read()

    def read_stat(self, name: str) -> tuple[bytes, Stat]:
        fd = self.open_file(name)
        with os.fdopen(fd, "rb") as f:
            return f.read(), Stat.of(os.fstat(fd))

    def read_at(self, name: str, offset: int, n: int) -> bytes:
        return self.read_ranges(name, [(offset, n)])[0]

    def read_ranges(self, name: str, ranges: list[tuple[int, int]]) -> list[bytes]:
        fd = self.open_file(name)
        try:
            return [os.pread(fd, n, a) for a, n in ranges]
        finally:
            os.close(fd)

    def stat(self, name: str = "") -> Stat | None:
        try:
            if not name:
                return Stat.of(os.fstat(self.root_fd))
            return self._at(name, lambda d, b: Stat.of(os.stat(b, dir_fd=d, follow_symlinks=False)))
        except (FileNotFoundError, NotADirectoryError):
            return None

    def listdir(self, sub: str = "") -> list[str]:
        try:
            if sub:
                split_name(sub)
            fd = self._dir(sub)
            return os.listdir(fd)
        except (FileNotFoundError, NotADirectoryError):
            if sub and self._evict(sub):
                return self.listdir(sub)
            return []

    # --- writes -------------------------------------------------------------------------------
    def _tmp(self, d: int, base: str) -> tuple[int, str]:
        from .files import current_umask

        for _ in range(100):
            tmp = f".{base}.{secrets.token_hex(4)}.tmp"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=d)
            except FileExistsError:
                continue
            os.fchmod(fd, 0o666 & ~current_umask())  # shared runs need the umask's mode
            return fd, tmp
        raise FileExistsError(self.where(base))

    def _write_tmp(self, d: int, base: str, data: bytes) -> str:
        fd, tmp = self._tmp(d, base)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            _unlink_quiet(tmp, d)
            raise
        return tmp

    def create(self, name: str, data: bytes, private: bool = False) -> bool:
        from .files import current_umask

        def op(d: int, base: str) -> bool:
            try:
                fd = os.open(base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=d)
            except FileExistsError:
                return False
            if not private:
                os.fchmod(fd, 0o666 & ~current_umask())
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True

        return self._at(name, op)

    def fd_path(self) -> str:
        """A path that names this pinned folder itself, whatever has been renamed since
        (/proc/self/fd/N): for a library that takes only paths (a spool folder)."""
        return fd_path(self.root_fd)

    @contextmanager
    def writing(self, name: str, written: str = "tmp_written", renamed: str = "renamed") -> Iterator[BinaryIO]:
        folder, base = split_name(name)
        d = self._dir(folder)
        fd, tmp = self._tmp(d, base)
        try:
            with os.fdopen(fd, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            faults.point(written, self.where(name))
            os.replace(tmp, base, src_dir_fd=d, dst_dir_fd=d)
            faults.point(renamed, self.where(name))
        except BaseException:
            _unlink_quiet(tmp, d)
            raise

    def replace(self, name: str, data: bytes) -> None:
        def op(d: int, base: str) -> None:
            tmp = self._write_tmp(d, base, data)
            try:
                faults.point("tmp_written", self.where(name))
                os.replace(tmp, base, src_dir_fd=d, dst_dir_fd=d)
                faults.point("renamed", self.where(name))
            except BaseException:
                _unlink_quiet(tmp, d)
                raise

        self._at(name, op)

    def append(self, name: str, data: bytes) -> None:
        from .files import current_umask

        def op(d: int, base: str) -> None:
            fd = os.open(base, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600, dir_fd=d)
            try:
                st = os.fstat(fd)
                if not stat_mod.S_ISREG(st.st_mode) or st.st_nlink != 1:
                    raise DamagedFile(f"{self.where(name)}: not a file of this folder's own (a link to another?)")
                if self._judge:
                    self._judge(fd, self.where(name))
                if st.st_size == 0:
                    os.fchmod(fd, 0o666 & ~current_umask())
                os.write(fd, data)
            finally:
                os.close(fd)

        self._at(name, op)

    def publish(self, name: str, data: bytes) -> bool:
        def op(d: int, base: str) -> bool:
            tmp = self._write_tmp(d, base, data)
            try:
                faults.point("tmp_written", self.where(name))
                won = link_won(
                    lambda: os.link(tmp, base, src_dir_fd=d, dst_dir_fd=d, follow_symlinks=False),
                    lambda: os.stat(tmp, dir_fd=d, follow_symlinks=False).st_nlink,
                )
                faults.point("renamed", self.where(name))
                return won
            finally:
                _unlink_quiet(tmp, d)

        return self._at(name, op)

    def rename(self, src: str, dst: str) -> None:
        (sf, sb), (df, db) = split_name(src), split_name(dst)
        os.rename(sb, db, src_dir_fd=self._dir(sf), dst_dir_fd=self._dir(df))

    def link(self, src: str, dst: str) -> None:
        (sf, sb), (df, db) = split_name(src), split_name(dst)
        os.link(sb, db, src_dir_fd=self._dir(sf), dst_dir_fd=self._dir(df), follow_symlinks=False)

    def unlink(self, name: str) -> None:
        self._at(name, lambda d, b: os.unlink(b, dir_fd=d))

    def touch(self, name: str) -> None:
        def op(d: int, base: str) -> None:
            try:
                os.utime(base, dir_fd=d, follow_symlinks=False)
            except FileNotFoundError:
                os.close(os.open(base, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644, dir_fd=d))

        self._at(name, op)

    def mkdir(self, name: str) -> None:
        folder, base = split_name(name)
        if folder and self.stat(folder) is None:
            self.mkdir(folder)
        try:
            os.mkdir(base, 0o777, dir_fd=self._dir(folder))
        except FileExistsError:
            pass

    def rmtree(self, name: str) -> None:
        folder, base = split_name(name)
        try:
            shutil.rmtree(base, dir_fd=self._dir(folder))
        except FileNotFoundError:
            pass
        self._evict(name)

    # --- identity -----------------------------------------------------------------------------
    def pin(self) -> Pin:
        """This run's identity (after `new_run_id`)."""
        return Pin(os.fstat(self.root_fd).st_ino, self.read(RUN_ID).decode().strip())

    def close(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = {}

    def __del__(self) -> None:
        self.close()

    # A handle is its descriptors: a copy (dataclasses.asdict, copy.deepcopy of a record that
    # holds one) is the same handle, never a second owner that would close them when collected.
    def __copy__(self) -> "PinnedDir":
        return self

    def __deepcopy__(self, memo: dict) -> "PinnedDir":
        return self


def _unlink_quiet(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def new_run_id(d: Dir) -> str:
    """The run's random id, readable by its owner alone (0600 whatever the run's permissions:
    a teammate reading the run cannot copy it into a directory of theirs)."""
    rid = secrets.token_hex(16)
    if not d.create(RUN_ID, rid.encode(), private=True):
        raise FileExistsError(d.where(RUN_ID))
    return rid
