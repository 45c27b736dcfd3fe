"""Two copies of a chunk (a backup and its original) publishing at once, in every order
their calls on the run directory can interleave (interleave.py): exactly one is published,
whole, and the other is told it lost. The check-then-replace publish this guards against
is run through the same explorer and must be caught: the test shows it can fail."""

from __future__ import annotations

from hpc_infer.rundir import publish_chunk_output
from hpc_infer.rundir.chunks import encode_chunk_output
from hpc_infer.rundir.fsio import Dir
from interleave import explore

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
