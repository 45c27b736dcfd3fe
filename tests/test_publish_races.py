"""Two copies of a chunk (a backup and its original) publishing at once, in every order
their calls on the run directory can interleave (interleave.py): exactly one is published,
whole, and the other is told it lost. The check-then-replace publish this guards against
is run through the same explorer and must be caught: the test shows it can fail."""

from __future__ import annotations

import os

from hpc_infer.rundir import publish_chunk_output
from hpc_infer.rundir.chunks import encode_chunk_output
from hpc_infer.rundir.fsio import Dir
from interleave import explore
from test_simulation import _old_link_won

NAME = "out/00000.jsonl"


def _output(who: str) -> bytes:
    return encode_chunk_output(0, [{"index": 0, "id": "a", "prompt_tokens": 1, "output_tokens": 1, "who": who}])


COPIES = {"first": _output("first"), "second": _output("second")}


def _copy(who: str, publish=publish_chunk_output):
    return lambda fs: publish(fs, NAME, 0, COPIES[who])


def _check(fs: Dir, results: list, errors: list) -> str | None:
    if any(errors):
        return f"a copy raised {[repr(e) for e in errors if e]}"
    if sorted(results) != [False, True]:
        return f"published {results.count(True)} times"
    winner = ("first", "second")[results.index(True)]
    if fs.read(NAME) != COPIES[winner]:
        return "the file there is not the winner's output"
    left = [n for n in fs.listdir("out") if n.startswith(".") and ".damaged-" not in n]
    return f"temp files left: {left}" if left else None


def _empty(fs: Dir) -> None:
    fs.mkdir("out")


def _damaged(fs: Dir) -> None:
    """An earlier copy's output cut short (no trailer): both copies find it and set it aside."""
    fs.mkdir("out")
    fs.replace(NAME, _output("killed")[:20])


def _check_then_replace(fs: Dir, name: str, chunk_id: int, data: bytes) -> bool:
    """The publish the real one replaced: look, then write over whatever is there."""
    if fs.exists(name):
        return False
    fs.replace(name, data)
    return True


def test_two_copies_publish_exactly_once_in_every_interleaving(tmp_path):
    for setup in (_empty, _damaged):
        runs, broken = explore(tmp_path, setup, [_copy("first"), _copy("second")], _check, depth=10)
        assert runs >= 2 and not broken, (setup.__name__, runs, broken[:3])


def test_the_explorer_catches_a_check_then_replace_publish(tmp_path):
    """The mutant: both copies look, find nothing, and both write: the explorer finds that
    interleaving (and the plain order, one after the other, passes: the old timing test's)."""
    copies = [_copy("first", _check_then_replace), _copy("second", _check_then_replace)]
    runs, broken = explore(tmp_path, _empty, copies, _check, depth=6)
    assert broken and all("published 2 times" in what for _, what in broken), broken
    assert len(broken) < runs  # some orders pass: a test of one order cannot tell


def test_a_link_whose_reply_was_lost_is_judged_by_the_temp_files_link_count(tmp_path, monkeypatch):
    """NFS: a LINK whose reply is lost is sent again, and the retry fails with EEXIST on the
    link the first made. The publisher must still know its output won (it counts it: progress,
    the report, GPU-hours per record), on the simulated file server and on the real handle (its
    link() made, then failing as the retry does). The old judgement calls both lost."""
    import errno

    from hpc_infer.rundir import fsio, simfs
    from hpc_infer.rundir.fsio import PinnedDir

    def real_lost_reply(src, dst, *, src_dir_fd=None, dst_dir_fd=None, follow_symlinks=True, _link=os.link):
        _link(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd, follow_symlinks=follow_symlinks)
        raise FileExistsError(errno.EEXIST, "exists (the retry of a link whose reply was lost)")

    def publishes(judge) -> list[bool]:
        server = simfs.SimServer(faults=simfs.Faults(link_lost=1.0))
        server.put_tree({"out/.keep": b""})
        sim = simfs.SimClient(server, "", "w0")
        (tmp_path / judge.__name__).mkdir()
        real = PinnedDir(tmp_path / judge.__name__)
        real.mkdir("out")
        got = []
        with monkeypatch.context() as m:
            m.setattr(simfs, "link_won", judge)
            m.setattr(fsio, "link_won", judge)
            m.setattr(os, "link", real_lost_reply)
            for fs in (sim, real):
                got.append(publish_chunk_output(fs, NAME, 0, COPIES["first"]))
                assert fs.read(NAME) == COPIES["first"]  # the link was made either way
                got.append(publish_chunk_output(fs, NAME, 0, COPIES["second"]))  # a real loser
                assert fs.read(NAME) == COPIES["first"]
                assert [n for n in fs.listdir("out") if n.startswith(".") and n != ".keep"] == []  # no temp left
        return got

    assert publishes(fsio.link_won) == [True, False, True, False]
    assert publishes(_old_link_won) == [False, False, False, False]  # the test fails on the old code


def test_a_set_aside_left_halfway_is_said_not_claimed_done(tmp_path, monkeypatch):
    """A damaged output whose set-aside stopped between its link and its unlink (a worker
    killed there, or a link reply lost) stays under both names: no later caller may unlink it
    (only the maker of the grave's name may). The launcher says so, naming both files and the
    fix, instead of saying it moved it; one it can move, it moves."""
    from hpc_infer import launch
    from hpc_infer.rundir import RunDir
    from hpc_infer.rundir.chunks import grave_of

    run = RunDir(tmp_path)
    run.make()
    for cid in (1, 2):
        run.fs.replace(run.out_name(cid), _output("killed")[:20])  # no trailer: damaged
    st = run.fs.stat(run.out_name(1))
    run.fs.link(run.out_name(1), grave_of(run.out_name(1), st))  # chunk 1's set-aside stopped halfway
    said = []
    monkeypatch.setattr(launch, "say", said.append)
    assert launch.set_aside_damaged(run) == [1, 2]
    assert run.fs.stat(run.out_name(1)).ino == st.ino and run.fs.stat(run.out_name(2)) is None
    assert said[0].startswith("chunk output [2] was damaged") and "moved aside" in said[0]
    assert "00001.jsonl is damaged" in said[1] and "stopped halfway" in said[1]
    assert grave_of(run.out_name(1), st).rpartition("/")[2] in said[1] and len(said) == 2
