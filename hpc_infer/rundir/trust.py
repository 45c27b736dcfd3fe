"""What a command may believe of a directory it reads back: one rule for every door.

Run directories, serve directories and the admin cache live on shared scratch, under
output roots others can often write, with names others can predict. What is in them is
data; a command *acts* on it (resumes it, loads a result pickle, runs a hook or a
command string, sends a key, signals a process) only when nobody but the caller could
have written it. The rule is OpenSSH's StrictModes:

- **own**: the path is owned by the caller (or root) and writable by nobody else: not by
  others, and not by its group unless that group is the owner's private group (a user
  private group: named after the user, no other members);
- **shared** (read-only): owned by someone else, writable by nobody but its owner, and
  readable by a group the caller belongs to: a teammate's `permissions=group` run. A
  command reads it as data (status, merge into a folder of the caller's) and acts on
  nothing in it.

A POSIX access ACL counts (`system.posix_acl_access`): a named user or group entry with
write, or a mask allowing write while named entries exist, is "writable by others", and
the private-group exception does not apply when an ACL is present (the mode's group bits
are then the mask). A folder's default ACL is judged the same way (what it would give the
files made in it). An NFSv4 ACL (`system.nfs4_acl`) cannot be judged here and is refused.

Everything else is refused with the path, its owner and mode, and the fix. Directories
are opened once as a pinned handle (rundir/fsio.py: `open_dir`) and judged on the
descriptor; files are opened with O_NOFOLLOW relative to it and checked on the open
descriptor (fstat), so a link or a swap between the check and the read is refused too.
Standard library only.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import stat
from pathlib import Path
from typing import Any

from ..errors import UserError

OWN, SHARED = "own", "shared"


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return f"gid {gid}"


def private_group(gid: int, uid: int) -> bool:
    """The owner's own group (a user private group), which no one else is in."""
    try:
        g, u = grp.getgrgid(gid), pwd.getpwuid(uid)
    except KeyError:
        return False
    return g.gr_name == u.pw_name and not [m for m in g.gr_mem if m != u.pw_name]


def _in_group(gid: int) -> bool:
    return gid == os.getgid() or gid in os.getgroups()


ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_GROUP, ACL_MASK, ACL_OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
ACL_WRITE = 0x02


def parse_acl(raw: bytes) -> list[tuple[int, int, int]]:
    """(tag, perm, id) entries of a Linux POSIX ACL xattr (version 2: a 4-byte header, then
    8-byte entries: u16 tag, u16 perm, u32 id)."""
    import struct

    if len(raw) < 4 or (len(raw) - 4) % 8 or struct.unpack_from("<I", raw)[0] != 2:
        raise ValueError("not a POSIX ACL")
    return [struct.unpack_from("<HHI", raw, 4 + 8 * k) for k in range((len(raw) - 4) // 8)]


def acl_problem(entries: list[tuple[int, int, int]], owner: int) -> str | None:
    """Why an ACL lets someone else write, or None."""
    named = [e for e in entries if e[0] in (ACL_USER, ACL_GROUP)]
    for tag, perm, ident in entries:
        if tag == ACL_USER and perm & ACL_WRITE and ident != owner:
            return f"writable by user {_user(ident)} (ACL entry)"
        if tag == ACL_GROUP and perm & ACL_WRITE:
            return f"writable by group {_group(ident)} (ACL entry)"
        if tag == ACL_GROUP_OBJ and perm & ACL_WRITE and named:
            return "writable by its group (ACL present: no private-group exception)"
        if tag == ACL_MASK and perm & ACL_WRITE and named:
            return "its ACL mask allows write while named entries exist"
    return None


def _xattr(target: int | str, name: str) -> bytes:
    """An extended attribute of a descriptor, or of a path without following a link."""
    if isinstance(target, int):
        return os.getxattr(target, name)
    return os.getxattr(target, name, follow_symlinks=False)


def read_acls(target: int | str, is_dir: bool) -> tuple[list | None, list | None, bool]:
    """(access ACL, default ACL, NFSv4 ACL present) of a descriptor or (not followed) path."""
    found: list = []
    for name in ("system.posix_acl_access", "system.posix_acl_default" if is_dir else ""):
        try:
            found.append(parse_acl(_xattr(target, name)) if name else None)
        except ValueError:
            found.append([(ACL_USER, ACL_WRITE, -1)])  # an ACL we cannot parse: judged as the worst
        except OSError:
            found.append(None)
    try:
        _xattr(target, "system.nfs4_acl")
        nfs4 = True
    except OSError:
        nfs4 = False
    return found[0], found[1], nfs4


def acl_verdict(target: int | str, st: os.stat_result) -> str | None:
    """Why the ACLs of a file or folder (by descriptor, or by path not followed) let someone
    else write, or None."""
    access, default, nfs4 = read_acls(target, stat.S_ISDIR(st.st_mode))
    if nfs4:
        return "it carries an NFSv4 ACL, which hpc_infer cannot judge"
    for entries, which in ((access, ""), (default, " (default ACL: what files made in it get)")):
        if entries:
            why = acl_problem(entries, st.st_uid)
            if why:
                return why + which
    return None


def verdict(st: os.stat_result, acl: str | None = None, has_acl: bool = False) -> tuple[str | None, str]:
    """(OWN, SHARED or None, why not) for a stat result (and its ACLs' verdict, when read)."""
    me = os.getuid()
    mode = stat.S_IMODE(st.st_mode)
    if mode & stat.S_IWOTH:
        return None, "writable by everyone"
    if acl:
        return None, acl
    if mode & stat.S_IWGRP and (has_acl or not private_group(st.st_gid, st.st_uid)):
        return None, f"writable by group {_group(st.st_gid)}"
    if st.st_uid in (me, 0):
        return OWN, ""
    if mode & stat.S_IRGRP and _in_group(st.st_gid):
        return SHARED, ""
    return None, f"owned by {_user(st.st_uid)}, not you"


def describe(path: Path, st: os.stat_result) -> str:
    return f"{path} (owner {_user(st.st_uid)}, group {_group(st.st_gid)}, mode {stat.filemode(st.st_mode)})"


def refusal(path: Path, st: os.stat_result, why: str, what: str, fix: str | None = None) -> UserError:
    if fix is None:
        fix = (
            f"if it is yours, remove the ACL entries: `setfacl -R -b {path}`"
            if "ACL" in why and st.st_uid == os.getuid()
            else f"if it is yours, run `chmod -R go-w {path}`"
            if "writable" in why and st.st_uid == os.getuid()
            else "use a directory of your own"
        )
    return UserError(
        f"{what}: refused {describe(path, st)}: {why}. hpc_infer acts only on what nobody but you "
        f"could have written; {fix}"
    )


def check(path: Path | str, what: str, need: str = OWN, fix: str | None = None) -> str:
    """OWN or SHARED for `path` (not followed if a link), or a UserError naming it. `need=OWN`
    refuses a shared path too: the caller is about to act on it."""
    path = Path(path)
    try:
        st = os.lstat(path)
    except OSError as e:
        raise UserError(f"{what}: cannot read {path} ({e.strerror})") from None
    if stat.S_ISLNK(st.st_mode):
        raise UserError(
            f"{what}: {path} is a symbolic link; hpc_infer reads a run's own files, never a link in their place"
        )
    level, why = verdict(st, acl_verdict(str(path), st), _has_acl(str(path), st))
    if level is None or (need == OWN and level != OWN):
        raise refusal(path, st, why or f"owned by {_user(st.st_uid)}: you may read it, not act on it", what, fix)
    return level


def _has_acl(target: int | str, st: os.stat_result) -> bool:
    access, _, _ = read_acls(target, stat.S_ISDIR(st.st_mode))
    return bool(access and any(e[0] in (ACL_USER, ACL_GROUP) for e in access))


def judge_fd(fd: int, path: str, what: str, need: str = OWN, fix: str | None = None) -> str:
    """The rule on an open descriptor (a pinned folder, a file opened without following a
    link): OWN or SHARED, or a UserError naming it."""
    st = os.fstat(fd)
    level, why = verdict(st, acl_verdict(fd, st), _has_acl(fd, st))
    if level is None or (need == OWN and level != OWN):
        raise refusal(Path(path), st, why or f"owned by {_user(st.st_uid)}: you may read it, not act on it", what, fix)
    return level


def exchangeable_parent(ancestors: list[tuple[str, os.stat_result]]) -> str | None:
    """The first folder above a directory that someone else could rename entries in (writable
    by others or a group, no sticky bit; OpenSSH's safe_path walks the same way): a run below
    it may be swapped for another by path, so it is trusted only through its pin."""
    for path, st in ancestors:
        mode = stat.S_IMODE(st.st_mode)
        if mode & stat.S_ISVTX:
            continue
        if mode & (stat.S_IWOTH | stat.S_IWGRP) and not (
            mode & stat.S_IWGRP and not mode & stat.S_IWOTH and private_group(st.st_gid, st.st_uid)
        ):
            return path
        if st.st_uid not in (0, os.getuid()):
            return path
    return None


def open_dir(path: Path | str, what: str, need: str = OWN, fix: str | None = None):
    """The pinned handle of a directory we read back (run, serve, tune store, cache, sweep):
    opened once without following links, judged on its descriptor, every sub-folder judged
    as it is opened, every file opened relative to it. A missing or refused directory is a
    UserError naming it."""
    from .fsio import PinnedDir

    path = Path(path)
    try:
        return PinnedDir(path, judge=lambda fd, where: judge_fd(fd, where, what, need, fix))
    except UserError:
        raise
    except OSError as e:
        if e.errno == 40 or e.errno == 20:  # ELOOP, ENOTDIR: a link (or a file) in a folder's place
            raise UserError(
                f"{what}: {path} is a symbolic link or not a folder; hpc_infer reads a run's own files, "
                f"never a link in their place"
            ) from None
        raise UserError(f"{what}: cannot open {path} ({e.strerror})") from None


def check_pin(d, pin, what: str) -> None:
    """Refuse a run directory that is not the one the launcher made (its inode and its
    owner-only run id): a folder swapped in by whoever can write a parent, named."""
    from .fsio import RUN_ID

    st = d.stat()
    try:
        rid = d.read(RUN_ID).decode().strip()
    except (OSError, UnicodeDecodeError):
        rid = None
    if st is None or st.ino != pin.ino or rid != pin.run_id:
        raise UserError(
            f"{what}: {d.path} is not the run directory this job was started for (its identity "
            f"changed: inode {st.ino if st else '?'} vs {pin.ino}, run id "
            f"{'matches' if rid == pin.run_id else 'differs'}); someone who can write a folder above "
            f"it may have swapped it. Nothing was read from it; put runs under a folder only you "
            f"can write (or a sticky one like /tmp) and launch again"
        )


def open_checked(path: Path | str, what: str, need: str = OWN) -> int:
    """A read-only descriptor of `path`, opened without following a link and checked on the
    descriptor itself (no swap between check and read)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        if e.errno == 40:  # ELOOP: a link in the file's place
            raise UserError(
                f"{what}: {path} is a symbolic link; hpc_infer reads a run's own files, never a link in their place"
            ) from None
        raise
    st = os.fstat(fd)
    level, why = verdict(st, acl_verdict(fd, st), _has_acl(fd, st))
    if level is None or (need == OWN and level != OWN) or not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise refusal(
            path,
            st,
            why
            or (
                "not a regular file"
                if not stat.S_ISREG(st.st_mode)
                else f"owned by {_user(st.st_uid)}: you may read it, not act on it"
            ),
            what,
        )
    return fd


def read_bytes(path: Path | str, what: str, need: str = OWN) -> bytes:
    with os.fdopen(open_checked(path, what, need), "rb") as f:
        return f.read()


def read_json(path: Path | str, what: str, need: str = OWN, kind: type = dict) -> Any:
    """JSON from a checked file, of the expected top-level type."""
    try:
        value = json.loads(read_bytes(path, what, need))
    except ValueError:
        raise UserError(f"{what}: {path} is not valid JSON") from None
    if not isinstance(value, kind):
        raise UserError(f"{what}: {path} holds {type(value).__name__}, not {kind.__name__}")
    return value


def check_tree(root: Path, what: str, need: str = OWN, subdirs: tuple[str, ...] = (), fix: str | None = None) -> str:
    """A run (or serve) directory and the folders in it that steps write into: each passes
    the rule, so nothing in them can have been put there by anyone else. Returns the
    directory's level (OWN, or SHARED when `need` allows it)."""
    level = check(root, what, need, fix)
    for name in subdirs:
        if os.path.lexists(root / name):
            check(root / name, what, need, fix)
    return level


def load_result_pickle(path: Path | str, what: str) -> Any:
    """submitit's `<job>_0_result.pkl` as plain data: ("success", value) or ("error", text).
    Only from a file the caller owns, and unpickled with no global allowed (the Python
    docs' "restricting globals"): a planted pickle cannot name a function to call."""
    import io
    import pickle

    class _Plain(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            raise pickle.UnpicklingError(f"{module}.{name} is not plain data")

    data = read_bytes(path, what, OWN)
    return _Plain(io.BytesIO(data)).load()


def process_of_run(pid: int, root: Path) -> bool:
    """The process is demonstrably this run's: the caller's own (same uid), and the run
    directory in its environment (HPC_INFER_RUN_DIR, set for every job we start) or on its
    command line (submitit's controller and job: `... <run>/logs`). A PID that a file merely
    names is never enough."""
    try:
        if os.stat(f"/proc/{pid}").st_uid != os.getuid():
            return False
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().split(b"\0")
    except OSError:
        return False
    want = os.fsencode(os.path.realpath(root))
    if any(arg == want or arg.startswith(want + b"/") for arg in cmdline):
        return True
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read().split(b"\0")
    except OSError:
        return False
    return (b"HPC_INFER_RUN_DIR=" + want) in env


def processes_of_run(root: Path) -> list[int]:
    """Every process of the caller's on this host whose environment names this run
    (HPC_INFER_RUN_DIR, inherited by everything a job starts): what is left of a run when
    the processes that started it were killed outright (vLLM's engine core under a
    SIGKILLed server is re-parented to init). Never this process or its parents."""
    want = b"HPC_INFER_RUN_DIR=" + os.fsencode(os.path.realpath(root))
    me, skip = os.getuid(), {os.getpid()}
    pid = os.getppid()
    while pid > 1 and pid not in skip:
        skip.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in skip:
            continue
        try:
            if os.stat(f"/proc/{name}").st_uid != me:
                continue
            with open(f"/proc/{name}/environ", "rb") as f:
                if want in f.read().split(b"\0"):
                    found.append(int(name))
        except OSError:
            continue
    return found
