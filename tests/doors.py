"""Doors discovered, not listed: every path a command touches in a run is found by a PEP 578
audit hook (tests/audit_site/sitecustomize.py) while the command runs as a user runs it,
then attacked with every kind an attacker (`mallory`, a real second user) has:

  owner        the file or folder made hers, its content forged
  group_write  group `team` may write it (chgrp + g+w), content forged
  other_write  anyone may write it (o+w), content forged
  acl          an ACL entry gives her write (setfacl -m u:mallory:rwX), content forged
  symlink      replaced by a link to the victim's file outside the run (or to her folder)
  hardlink     replaced by a hard link to the victim's file outside the run
  exchange     (the run folder) her forged copy swapped with it by renameat2(RENAME_EXCHANGE)
               in a loop while the command runs (the run's parent is world-writable, no sticky bit)

The commands: `launch` (discovery only: it makes the run), resume (the same launch again),
`sbatch` (a script rendered for the existing run), `status`, `merge`, `report`, `cancel`;
and on a serve run (`serve` with `wait=false`, then `serve stop`: discovery only) `serve
status`, `serve metrics --once` and `serve stop`.

Forged content carries a canary string and, where a file can name code, code that would
create a canary file (a merge hook that runs `touch`, a PYTHONPATH with a sitecustomize); job
records name her sentinel process's pid. After each attack the invariants: nothing executed
(no canary file), the canary string in nothing the command wrote (no foreign record merged,
nothing forged reported), the victim's file unchanged and never copied out, her sentinel
process alive (no stray signal), nothing outside the run and the command's own output written.
A door added later is attacked without anyone writing a test for it: the list comes from
the audit log.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from conftest import BIN, ROOT

AUDIT_SITE = ROOT / "tests" / "audit_site"
KINDS = ("owner", "group_write", "other_write", "acl", "symlink", "hardlink")
COMMANDS = ("resume", "sbatch", "status", "merge", "report", "cancel")
SERVE_COMMANDS = ("serve_status", "serve_metrics", "serve_stop")  # on the serve run
SWEEP_COMMANDS = ("sweep_report", "sweep_launch")  # on a multirun's sweep folder
CACHE_COMMANDS = ("cache_list", "cache_verify", "cache_catalog", "cache_stage")  # on an admin's model cache
TUNE_COMMANDS = ("tune", "tune_launch")  # on an output root holding a tune folder and the tune store
BASE_OF = {
    **{c: "tune" for c in TUNE_COMMANDS},
    **{c: "serve" for c in SERVE_COMMANDS},
    **{c: "sweep" for c in SWEEP_COMMANDS},
    **{c: "cache" for c in CACHE_COMMANDS},
}
FAKE = json.dumps({"step_s": 0.001, "max_num_seqs": 8})


def exchange_as(user: str, a: Path, b: Path) -> int:
    """A child process of hers (forked, then setuid: no interpreter of ours to find) that
    swaps `a` and `b` with renameat2(RENAME_EXCHANGE) in a loop until it is killed."""
    import ctypes
    import pwd

    pw = pwd.getpwnam(user)
    pid = os.fork()
    if pid:
        return pid
    try:
        os.setsid()
        os.setgroups([])
        os.setgid(pw.pw_gid)
        os.setuid(pw.pw_uid)
        libc = ctypes.CDLL(None, use_errno=True)
        x, y = str(a).encode(), str(b).encode()
        while True:
            libc.renameat2(-100, x, -100, y, 2)  # AT_FDCWD, RENAME_EXCHANGE
    finally:
        os._exit(0)


@dataclass
class Site:
    top: Path  # root-owned 0755
    runs: Path  # the output root: world-writable, no sticky bit (the harshest parent)
    out: Path  # the victim's own folder for reports
    victim: Path  # the victim's file outside any run
    victim_sha: str
    mallory_dir: Path  # her folder (a PYTHONPATH, a link target)
    canary: str  # the string forged content carries
    executed: Path  # code run from forged content would create this
    base_args: list[str]
    sentinel: subprocess.Popen | None = None
    home: Path | None = None  # HOME of the serve commands (their key directory)
    bases: dict[str, Path] = field(default_factory=dict)  # "batch", "serve", "sweep" -> the victim's own
    doors: dict[str, set[str]] = field(default_factory=dict)  # command -> run-relative paths
    effects: dict[str, dict[str, int]] = field(default_factory=dict)  # command -> processes/connections/signals


def user_env(audit_log: Path | None = None, home: Path | None = None) -> dict:
    env = dict(os.environ, PATH=f"{BIN}:{os.environ.get('PATH', '')}", HPC_INFER_FAKE_ENGINE=FAKE)
    if home is not None:
        env["HOME"] = str(home)
    env.pop("PYTHONPATH", None)
    env.pop("HPC_INFER_AUDIT_LOG", None)
    if audit_log is not None:
        env.update(PYTHONPATH=str(AUDIT_SITE), HPC_INFER_AUDIT_LOG=str(audit_log))
    return env


def run_cmd(site: Site, command: str, run: Path, audit_log: Path | None = None, timeout: int = 300):
    line = {
        "resume": "hpc-infer launch " + " ".join(site.base_args) + f" run_name={run.name}",
        "sbatch": "hpc-infer sbatch " + " ".join(site.base_args) + f" run_name={run.name}",
        "status": f"hpc-infer status {run}",
        "merge": f"hpc-infer merge {run}",
        "report": f"hpc-infer report {run} --out {site.out / (run.name + '.html')}",
        "cancel": f"hpc-infer cancel {run}",
        "serve_status": f"hpc-infer serve status {run}",
        "serve_metrics": f"hpc-infer serve metrics {run} --once",
        "serve_stop": f"hpc-infer serve stop {run}",
        "sweep_report": f"hpc-infer report {run} --out {site.out / (run.name + '.html')}",
        "sweep_launch": sweep_line(site, run, f"{run}-o"),
        "cache_list": f"hpc-infer cache list --root {run}",
        "cache_verify": f"hpc-infer cache verify --root {run}",
        "cache_catalog": f"hpc-infer cache catalog --root {run}",
        "cache_stage": f"hpc-infer cache stage {tiny_model(site, 'Tiny-Two')} --root {run}",
        "tune": tune_line(site, run),
        "tune_launch": "hpc-infer launch " + " ".join(_args_but_root(site)) + f" output_root={run} run_name=t",
    }[command]
    cwd = site.top / "cwd"
    out, err = cwd / "stdout", cwd / "stderr"
    home = site.home if command.startswith("serve") else None
    with open(out, "w") as fo, open(err, "w") as fe:
        rc = subprocess.run(
            ["bash", "-c", line], cwd=cwd, env=user_env(audit_log, home), stdout=fo, stderr=fe, timeout=timeout
        ).returncode
    return rc, out.read_text(), err.read_text()


def make_site(top: Path) -> Site:
    top.chmod(0o755)
    runs, out, cwd, mal = top / "runs", top / "out", top / "cwd", top / "mallory"
    for d in (runs, out, cwd, mal):
        d.mkdir()
    runs.chmod(0o777)  # others may rename entries here: allowed only because every run is pinned
    shutil.chown(mal, "mallory", "mallory")
    canary = "CANARY-" + os.urandom(6).hex()
    victim = top / "victim.txt"
    victim.write_text(f"VICTIM-SECRET-{canary}\n")
    victim.chmod(0o644)
    executed = top / "EXECUTED"
    (mal / "sitecustomize.py").write_text(f"open({str(executed)!r}, 'w').write('sitecustomize')\n")
    data = top / "prompts.jsonl"
    data.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"Question {i}?"}) + "\n" for i in range(6)))
    base_args = [
        "cluster=local",
        "cluster.workers=1",
        f"data.path={data}",
        "sampling.max_tokens=2",
        f"output_root={runs}",
    ]
    return Site(top, runs, out, victim, _sha(victim), mal, canary, executed, base_args)


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _make_base(site: Site, kind: str, line: str, base: Path, commands: tuple[str, ...]) -> None:
    """The victim makes `base` with `line` (bash, under the audit hook: the making command's
    doors and effects, under `kind`), then each of `commands` is discovered on a copy of it."""
    log = site.top / f"audit-{kind}.jsonl"
    p = subprocess.run(
        ["bash", "-c", line], cwd=site.top / "cwd", env=user_env(log), capture_output=True, text=True, timeout=600
    )
    assert p.returncode == 0, (line, p.stderr[-3000:])
    site.doors[kind], site.effects[kind] = discovered(log, base)
    _discover(site, base, commands)


def plan_base(site: Site) -> Path:
    """The victim's complete run (fake engine), then each command run on a copy of it under
    the audit hook: the doors are every run path any of their processes touched."""
    base = site.runs / "base"
    _make_base(site, "launch", "hpc-infer launch " + " ".join(site.base_args) + " run_name=base", base, COMMANDS)
    site.bases["batch"] = base
    return base


def _discover(site: Site, base: Path, commands: tuple[str, ...]) -> None:
    """Each command run on a copy of `base` under the audit hook: its doors and effects."""
    for command in commands:
        run = fresh_copy(site, base, f"discover-{command}")
        log = site.top / f"audit-{command}.jsonl"
        rc, _out, err = run_cmd(site, command, run, log)
        assert rc == 0, (command, err[-3000:])
        site.doors[command], site.effects[command] = discovered(log, run)


def plan_serve_base(site: Site, model: str) -> Path:
    """The victim's serve run, as `serve` makes it (a local replica, not waited for) and
    `serve stop` ends it; then each serve command on a copy of it under the audit hook."""
    site.home = site.top / "home"
    site.home.mkdir(mode=0o700, exist_ok=True)
    line = f"hpc-infer serve cluster=local wait=false model.path={model} output_root={site.runs} run_name=servebase"
    env = user_env(site.top / "audit-serve.jsonl", site.home)
    for cmd in (line, f"hpc-infer serve stop {site.runs / 'servebase'}"):
        p = subprocess.run(
            ["bash", "-c", cmd], cwd=site.top / "cwd", env=env, capture_output=True, text=True, timeout=600
        )
        assert p.returncode == 0, (cmd, p.stderr[-3000:])
    base = site.runs / "servebase"
    site.doors["serve"], site.effects["serve"] = discovered(site.top / "audit-serve.jsonl", base)
    _discover(site, base, SERVE_COMMANDS)
    site.bases["serve"] = base
    return base


def sweep_line(site: Site, sweep: Path, output_root: Path | str) -> str:
    """A two-point multirun into the sweep folder `sweep` (Hydra's multirun.yaml, runs.txt)."""
    args = " ".join(a for a in site.base_args if not a.startswith("output_root="))
    return (
        f"hpc-infer launch --multirun seed=1,2 {args} output_root={output_root} 'run_name=s${{seed}}' "
        f"hydra.sweep.dir={sweep}"
    )


def plan_sweep_base(site: Site) -> Path:
    """The victim's multirun sweep folder, as `launch --multirun` makes it; then each sweep
    command (report on it, another multirun into it) on a copy of it under the audit hook."""
    base = site.runs / "sweepbase"
    _make_base(site, "sweep", sweep_line(site, base, site.runs), base, SWEEP_COMMANDS)
    site.bases["sweep"] = base
    return base


def tiny_model(site: Site, name: str) -> Path:
    """A model folder as an admin downloads one (config.json, a small safetensors file)."""
    src = site.top / "downloads" / name
    if not src.is_dir():
        import numpy as np
        from safetensors.numpy import save_file

        src.mkdir(parents=True)
        (src / "config.json").write_text('{"model_type": "llama"}')
        save_file({"w": np.ones((8, 8), dtype=np.float32)}, str(src / "model.safetensors"))
        for p in (src.parent, src, src / "config.json", src / "model.safetensors"):
            p.chmod(0o755 if p.is_dir() else 0o644)  # meant to be shared: everyone may read it
    return src


def plan_cache_base(site: Site) -> Path:
    """The admin's model cache with one model staged (`cache stage`), then each cache command
    on a copy of it under the audit hook."""
    base = site.runs / "cachebase"
    line = f"hpc-infer cache stage {tiny_model(site, 'Tiny-One')} --root {base} --hf-id org/Tiny-One"
    _make_base(site, "cache", f"mkdir -p {base} && {line}", base, CACHE_COMMANDS)
    site.bases["cache"] = base
    return base


def _args_but_root(site: Site) -> list[str]:
    return [a for a in site.base_args if not a.startswith("output_root=")]


def tune_line(site: Site, output_root: Path) -> str:
    """`hpc-infer tune` on the fake engine: its tune folder and the tune store under `output_root`."""
    return (
        "hpc-infer tune "
        + " ".join(_args_but_root(site))
        + f" tune.sample=4 tune.budget_s=60 output_root={output_root}"
    )


def plan_tune_base(site: Site) -> Path:
    """An output root after `hpc-infer tune` (the tune folder, the kept settings in tuned/),
    then tune again and a launch that applies the kept settings, on copies of it, under the
    audit hook."""
    base = site.runs / "tunebase"
    _make_base(site, "tune-first", tune_line(site, base), base, TUNE_COMMANDS)
    site.bases["tune"] = base
    return base


def fresh_copy(site: Site, base: Path, name: str) -> Path:
    dst = site.runs / name
    subprocess.run(["cp", "-a", str(base), str(dst)], check=True)
    return dst


def discovered(log: Path, run: Path) -> tuple[set[str], dict[str, int]]:
    """Run-relative paths touched (absolute paths under the run, and names opened relative to
    a directory handle, matched against the run's tree) and counts of processes started,
    connections made and signals sent."""
    tree = {str(p.relative_to(run)) for p in run.rglob("*")} | {"."}
    by_tail: dict[str, set[str]] = {}
    for rel in tree:
        parts = rel.split("/")
        for k in range(len(parts)):
            by_tail.setdefault("/".join(parts[k:]), set()).add(rel)
    doors: set[str] = set()
    effects = {"processes": 0, "connections": 0, "signals": 0}
    for line in log.read_text().splitlines() if log.exists() else []:
        ev = json.loads(line)
        e, args = ev["e"], ev["a"]
        if e in ("subprocess.Popen", "os.posix_spawn", "os.exec"):
            effects["processes"] += 1
            continue
        if e == "socket.connect":
            effects["connections"] += 1
            continue
        if e in ("os.kill", "os.killpg"):
            effects["signals"] += 1
            continue
        for a in args[:2]:
            if not isinstance(a, str) or not a or a.endswith((".py", ".pyc", ".so")):
                continue
            if a.startswith("/"):
                if a == str(run) or a.startswith(str(run) + "/"):
                    rel = os.path.relpath(a, run)
                    doors.add(rel if rel in tree else _existing_parent(rel, tree))
            else:
                doors |= by_tail.get(a.rstrip("/"), set())
    if doors:
        doors.add(".")  # the folder itself: every command acts on it (opened component by component)
    return doors, effects


def _existing_parent(rel: str, tree: set[str]) -> str:
    while rel not in tree and "/" in rel:
        rel = rel.rsplit("/", 1)[0]
    return rel if rel in tree else "."


def forge(path: Path, site: Site, pid: int) -> None:
    """Content an attacker writes: the canary in every text, her pid where a process is named,
    code where a file can name code."""
    if path.is_dir():
        (path / "planted.jsonl").write_text(json.dumps({"id": "r0", "text": site.canary}) + "\n")
        return
    name = path.name
    if path.parent.name == "tuned" and name.endswith(".yaml"):  # the tune store: flags that run code
        path.write_text(
            json.dumps({"model": {"engine_kwargs": {"trust_remote_code": True, "tokenizer": site.canary}}}) + "\n"
        )
        return
    if name == "config.yaml":
        from omegaconf import OmegaConf

        c = OmegaConf.load(path)
        OmegaConf.update(
            c,
            "merge.postprocess",
            {"_target_": "os.system", "command": f"touch {site.executed}"},
            force_add=True,
        )
        path.write_text(OmegaConf.to_yaml(c))
        return
    raw = path.read_bytes()
    try:
        text = raw.decode()
        if name.endswith(".json"):
            data = _forge_json(json.loads(text), site, pid)
            if name == "worker.json" and isinstance(data, dict):
                data["env"] = {"PYTHONPATH": str(site.mallory_dir)}
            path.write_text(json.dumps(data))
            return
        if ".jsonl" in name or name.endswith(".txt"):
            lines = []
            for ln in text.splitlines():
                try:
                    lines.append(json.dumps(_forge_json(json.loads(ln), site, pid)))
                except ValueError:
                    lines.append(site.canary)
            path.write_text("\n".join(lines) + "\n")
            return
    except (UnicodeDecodeError, ValueError):
        pass
    path.write_bytes(raw + site.canary.encode() + b"\n")


def _forge_json(v, site: Site, pid: int, key: str = ""):
    if isinstance(v, dict):
        return {k: _forge_json(x, site, pid, k) for k, x in v.items()}
    if isinstance(v, list):
        return [_forge_json(x, site, pid, key) for x in v]
    if "pid" in key.lower() or "job" in key.lower():
        return pid if isinstance(v, int) else str(pid)
    if isinstance(v, str):
        return site.canary
    return v


def attack(site: Site, run: Path, rel: str, kind: str, pid: int) -> bool:
    """Apply one attack to run/rel; False when it does not apply (a hard link to a folder)."""
    target = run / rel
    if not os.path.lexists(target):  # a transient file (a clock probe) seen while the command ran
        return False
    is_dir = target.is_dir() and not target.is_symlink()
    if kind == "hardlink" and is_dir:
        return False
    if kind in ("owner", "group_write", "other_write", "acl"):
        forge(target, site, pid)
        if kind == "owner":
            shutil.chown(target, "mallory", "mallory")
        elif kind == "group_write":
            shutil.chown(target, group="team")
            target.chmod(target.stat().st_mode | 0o020)
        elif kind == "other_write":
            target.chmod(target.stat().st_mode | 0o002)
        else:
            subprocess.run(["setfacl", "-m", "u:mallory:rwX", str(target)], check=True)
        return True
    if is_dir:
        shutil.rmtree(target)
    else:
        target.unlink()
    if kind == "symlink":
        target.symlink_to(site.mallory_dir if is_dir else site.victim)
    else:
        os.link(site.victim, target)
    return True


def snapshot(root: Path) -> dict[int, tuple[int, int]]:
    """inode -> (mtime_ns, size) of every plain file under root: a file renamed keeps its entry."""
    out = {}
    for p in root.rglob("*"):
        try:
            st = p.lstat()
        except OSError:
            continue
        if p.is_file() and not p.is_symlink():
            out[st.st_ino] = (st.st_mtime_ns, st.st_size)
    return out


def written(root: Path, before: dict[int, tuple[int, int]]) -> list[Path]:
    """Plain files under root created or changed since `before` (by inode, so a forged file the
    command only renamed aside is not counted as written by it)."""
    out = []
    for p in root.rglob("*"):
        try:
            st = p.lstat()
        except OSError:
            continue
        if p.is_file() and not p.is_symlink() and before.get(st.st_ino) != (st.st_mtime_ns, st.st_size):
            out.append(p)
    return out


@dataclass
class Verdict:
    command: str
    rel: str
    kind: str
    rc: int
    violations: list[str]

    def line(self) -> str:
        return f"{self.command} {self.rel} {self.kind}: rc={self.rc} {'; '.join(self.violations) or 'held'}"


def check_one(site: Site, base: Path | None, k: int, command: str, rel: str, kind: str) -> Verdict | None:
    base = site.bases[BASE_OF.get(command, "batch")]
    run = fresh_copy(site, base, f"a{k}")
    sentinel = subprocess.Popen(["sleep", "600"], user="mallory", group="mallory", start_new_session=True)
    exchanger = None
    try:
        if kind == "exchange":
            forged = fresh_copy(site, base, f"a{k}-forged")
            for p in forged.rglob("*"):
                if p.is_file() and p.suffix in (".jsonl", ".json", ".yaml"):
                    forge(p, site, sentinel.pid)
            subprocess.run(["chown", "-R", "mallory:mallory", str(forged)], check=True)
            before = snapshot(site.top)
            exchanger = exchange_as("mallory", run, forged)
        elif not attack(site, run, rel, kind, sentinel.pid):
            sentinel.kill()  # (a process the test started: stopped on every way out)
            sentinel.wait()
            return None
        else:
            before = snapshot(site.top)
        rc, out, err = run_cmd(site, command, run)
    except BaseException:
        sentinel.kill()
        sentinel.wait()
        raise
    finally:
        if exchanger is not None:
            os.kill(exchanger, signal.SIGKILL)
            os.waitpid(exchanger, 0)
    violations = []
    if site.executed.exists():
        violations.append("EXECUTED: code from a forged file ran")
        site.executed.unlink()
    if sentinel.poll() is not None:
        violations.append(f"SIGNALLED: mallory's process {sentinel.pid} was stopped")
    else:
        sentinel.send_signal(signal.SIGKILL)
        sentinel.wait()
    if _sha(site.victim) != site.victim_sha:
        violations.append("OVERWRITTEN: the victim's file outside the run changed")
        site.victim.write_text(f"VICTIM-SECRET-{site.canary}\n")
        site.victim_sha = _sha(site.victim)
    changed = written(site.top, before)
    for p in changed:
        if not (p.is_relative_to(site.out) or p.is_relative_to(run)):
            continue
        body = p.read_bytes()
        if f"VICTIM-SECRET-{site.canary}".encode() in body:
            violations.append(f"LEAKED: the victim's file copied into {p.relative_to(site.top)}")
        elif site.canary.encode() in body:
            violations.append(f"FORGED: forged content in {p.relative_to(site.top)}")
    if f"VICTIM-SECRET-{site.canary}" in out + err:
        violations.append("LEAKED: the victim's file printed")
    mine = (site.runs, site.out, site.top / "cwd", site.mallory_dir, *([site.home] if site.home else []))
    outside = [p for p in changed if not any(p.is_relative_to(r) for r in mine)]
    if outside:
        violations.append(f"WROTE OUTSIDE: {[str(p) for p in outside][:3]}")
    if rc not in (0, 2) and not (command == "cache_verify" and rc == 1 and "Traceback" not in err):  # 1: BROKEN found
        violations.append(f"CRASHED (rc {rc}): {err.strip().splitlines()[-1:] if err.strip() else ''}")
    subprocess.run(["rm", "-rf", str(run), str(site.runs / f"a{k}-forged"), f"{run}-o"])
    return Verdict(command, rel, kind, rc, violations)


def matrix(site: Site) -> list[tuple[str, str, str]]:
    commands = [
        c for c in (*COMMANDS, *SERVE_COMMANDS, *SWEEP_COMMANDS, *CACHE_COMMANDS, *TUNE_COMMANDS) if c in site.doors
    ]
    cells = [(c, rel, kind) for c in commands for rel in sorted(site.doors[c]) for kind in KINDS]
    cells += [(c, ".", "exchange") for c in commands]
    return cells


def sample(cells: list, seed: int, n: int) -> list:
    rng = random.Random(seed)
    return rng.sample(cells, min(n, len(cells)))
