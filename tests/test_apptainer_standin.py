"""The bubblewrap stand-in for `apptainer exec` (tests/apptainer_standin/) against the
behaviour the Apptainer user docs describe (bind_paths_and_mounts,
environment_and_metadata). The container runs below use it in place of Apptainer,
which cannot be installed on these machines; these tests keep it honest."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

STANDIN = Path(__file__).resolve().parent / "apptainer_standin"
sys.path.insert(0, str(STANDIN))
from image import build_image  # noqa: E402
from conftest import shim_calls, tool_shims  # noqa: E402

pytestmark = pytest.mark.skipif(
    shutil.which("bwrap") is None and not os.environ.get("HPC_INFER_REQUIRE_SLURM"),
    reason="bubblewrap is not installed (scripts/setup.sh installs it as root: apt-get install bubblewrap)",
)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """A small image: the OS and its python3, with only `packaging` in dist-packages."""
    img = build_image(
        tmp_path_factory.mktemp("img") / "sandbox",
        package="packaging",
        environment="export FROM_IMAGE=image\nexport OVERRIDE_ME=image\n",
    )
    (img / "opt" / "in-image.txt").write_text("inside\n")
    return img


def run(*args, env=None, cwd=None, check=False, timeout=60):
    base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root")}
    return subprocess.run(
        [str(STANDIN / "apptainer"), *args],
        env=dict(base, **(env or {})),
        cwd=cwd,
        capture_output=True,
        text=True,
        check=check,
        timeout=timeout,
    )


def sh(image, script, *flags, **kw):
    return run("exec", *flags, str(image), "sh", "-c", script, **kw)


def test_image_is_root_and_read_only(image, tmp_path):
    # --contain: no host /tmp, $HOME or cwd, so the checkout is hidden wherever it lives
    p = sh(
        image,
        "cat /opt/in-image.txt; test -e " + str(Path(__file__).resolve()) + " && echo LEAK; "
        "touch /usr/x 2>/dev/null || echo read-only; python3 -c 'import sys; print(sys.executable)'",
        "--contain",
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["inside", "read-only", "/usr/bin/python3"]  # the checkout is not inside


def test_default_mounts_home_tmp_cwd(image, tmp_path):
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(), work.mkdir()
    (home / "h.txt").write_text("home\n")
    p = sh(
        image, "cat $HOME/h.txt; pwd; echo x > /tmp/from-container-$$ && echo tmp-rw", env={"HOME": str(home)}, cwd=work
    )
    assert p.stdout.split() == ["home", str(work), "tmp-rw"], p.stderr
    import tempfile

    real_home = Path(os.path.expanduser("~"))  # not under /tmp, which is mounted anyway
    probe = Path(tempfile.mkdtemp(dir=real_home, prefix=".standin-probe-"))
    try:
        p = sh(image, f"test -e {probe} && echo home-seen || echo no-home", env={"HOME": str(real_home)})
        q = sh(image, f"test -e {probe} && echo home-seen || echo no-home", "--no-home", env={"HOME": str(real_home)})
    finally:
        probe.rmdir()
    assert (p.stdout.strip(), q.stdout.strip()) == ("home-seen", "no-home")
    (Path("/tmp") / f"standin-probe-{os.getpid()}").write_text("x")
    try:
        p = sh(
            image,
            f"test -e /tmp/standin-probe-{os.getpid()} && echo host-tmp || echo private-tmp; "
            "test -e $HOME/h.txt || echo empty-home",
            "--contain",
            env={"HOME": str(home)},
        )
    finally:
        (Path("/tmp") / f"standin-probe-{os.getpid()}").unlink()
    assert p.stdout.split() == ["private-tmp", "empty-home"]


def test_binds(image, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("data\n")
    p = sh(
        image,
        "cat /data/ro/f; echo w > /data/ro/g 2>/dev/null || echo ro-refused; echo w > /data/rw/g",
        "--bind",
        f"{src}:/data/ro:ro",
        "-B",
        f"{src}:/data/rw",
    )  # destinations the image lacks: underlay
    assert p.stdout.split() == ["data", "ro-refused"], p.stderr
    assert (src / "g").read_text() == "w\n"  # rw writes land on the host
    p = sh(image, "cat /a/f /b/f", "--bind", f"{src}:/a,{src}:/b:ro")  # comma-separated list
    assert p.stdout == "data\ndata\n"
    p = sh(image, "true", "--bind", "/no/such/dir:/data")
    assert p.returncode == 255 and "mount source /no/such/dir doesn't exist" in p.stderr


def test_environment_precedence(image, tmp_path):
    env = {
        "HOST_VAR": "host",
        "OVERRIDE_ME": "host",
        "PS1": "x$ ",
        "LD_LIBRARY_PATH": "/host/lib",
        "SINGULARITYENV_INJ": "sing",
        "APPTAINERENV_INJ2": "app",
        "SINGULARITYENV_BOTH": "s",
        "APPTAINERENV_BOTH": "a",
        "APPTAINERENV_PREPEND_PATH": "/first",
        "TERM": "xterm",
    }
    show = "echo $HOST_VAR/$FROM_IMAGE/$OVERRIDE_ME/$INJ/$INJ2/$BOTH/$LD_LIBRARY_PATH/$PATH"
    p = sh(image, show, "--env", "OVERRIDE_ME=flag", env=env)
    assert p.stdout.strip() == (
        "host/image/flag/sing/app/a//.singularity.d/libs/"
        "/first:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    ), p.stderr
    p = sh(image, show + "; echo $TERM", env=env)  # the image's %environment beats the host's value
    assert p.stdout.split("/")[2] == "image" and p.stdout.split()[-1] == "xterm"
    p = sh(image, "env", "--cleanenv", env=env)
    names = {line.split("=")[0] for line in p.stdout.splitlines()}
    assert (
        "HOST_VAR" not in names
        and "PS1" not in names
        and {"HOME", "TERM", "INJ", "INJ2", "FROM_IMAGE", "PATH"} <= names
    )
    assert not any(n.startswith(("APPTAINERENV_", "SINGULARITYENV_", "__STANDIN")) for n in names)


def test_values_never_on_a_command_line(image, tmp_path):
    """Every argv the stand-in starts bwrap with is recorded (a PATH shim: exhaustive, where a
    /proc snapshot misses short-lived processes); the value reaches the container's
    environment, never a command line."""
    secret = "hf_STANDIN_" + os.urandom(6).hex()
    shims, log = tool_shims(tmp_path / "shims", tools=("bwrap",))
    p = subprocess.run(
        [str(STANDIN / "apptainer"), "exec", "--cleanenv", str(image), "printenv", "HF_TOKEN"],
        env={"PATH": f"{shims}:{os.environ['PATH']}", "HOME": str(tmp_path), "APPTAINERENV_HF_TOKEN": secret},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0 and p.stdout.strip() == secret, p.stderr
    calls = shim_calls(log)
    assert len(calls) == 1 and calls[0][0].endswith("bwrap") and "printenv" in calls[0], calls
    assert not [c for c in calls if any(secret in word for word in c)]


def test_nv_recorded_unknown_flags_and_sif_refused(image, tmp_path):
    log = tmp_path / "calls.jsonl"
    p = sh(image, "true", "--nv", env={"APPTAINER_STANDIN_LOG": str(log)})
    assert p.returncode == 0 and json.loads(log.read_text())["nv"] is True
    p = sh(image, "true", "--fakeroot")
    assert p.returncode == 255 and "unknown flag: --fakeroot" in p.stderr
    sif = tmp_path / "x.sif"
    sif.write_bytes(b"SIF")
    p = run("exec", str(sif), "true")
    assert p.returncode == 255 and "sandbox-directory images only" in p.stderr
    assert run("run", str(image)).returncode == 255


def test_signals_reach_the_container_process(image, tmp_path):
    script = tmp_path / "trap.sh"
    script.write_text("trap 'exit 42' USR1\necho ready\nwhile true; do sleep 0.1; done\n")
    proc = subprocess.Popen(
        [str(STANDIN / "apptainer"), "exec", str(image), "sh", str(script)],
        stdout=subprocess.PIPE,
        text=True,
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)},
    )
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=30) == 42
