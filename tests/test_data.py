"""Prompt input: formats, ids, templates, and malformed input named by file and line."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hpc_infer.config import DataConfig
from hpc_infer.io.data import load_records
from hpc_infer.errors import UserError


def cfg(path, **kw):
    return DataConfig(name="t", path=str(path), **kw)


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_jsonl_with_ids_and_extra_fields(tmp_path):
    p = write(tmp_path, "a.jsonl", '{"id": "x", "prompt": "hi", "answer": 3}\n\n{"id": "y", "prompt": "yo"}\n')
    recs = load_records(cfg(p))
    assert [(r.index, r.id, r.prompt) for r in recs] == [(0, "x", "hi"), (1, "y", "yo")]
    assert recs[0].fields == {"answer": 3}


def test_ids_derived_from_position_when_absent(tmp_path):
    p = write(tmp_path, "a.jsonl", '{"prompt": "a"}\n{"prompt": "b"}\n')
    assert [r.id for r in load_records(cfg(p))] == ["0", "1"]


def test_txt_csv_parquet(tmp_path):
    assert [r.prompt for r in load_records(cfg(write(tmp_path, "p.txt", "one\n\ntwo\n")))] == ["one", "two"]
    csv = write(tmp_path, "p.csv", "id,question\nq1,What?\nq2,Why?\n")
    assert [(r.id, r.prompt) for r in load_records(cfg(csv, prompt_field="question"))] == [
        ("q1", "What?"),
        ("q2", "Why?"),
    ]
    pq.write_table(
        pa.Table.from_pylist([{"id": "a", "prompt": "p1"}, {"id": "b", "prompt": "p2"}]), tmp_path / "p.parquet"
    )
    assert [r.id for r in load_records(cfg(tmp_path / "p.parquet"))] == ["a", "b"]


def test_messages_and_system_prompt(tmp_path):
    p = write(tmp_path, "c.jsonl", json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    (r,) = load_records(cfg(p, system_prompt="be brief"))
    assert r.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert r.prompt is None


def test_template_file_and_question_alias(tmp_path):
    t = write(tmp_path, "t.prompt", "Q: {question}\nA({answer}):")
    p = write(tmp_path, "m.jsonl", '{"problem": "1+1", "answer": "2"}\n')
    (r,) = load_records(cfg(p, prompt_field="problem", template_file=str(t)))
    assert r.prompt == "Q: 1+1\nA(2):"


def scan(path, **kw):
    """The planner's pass (InputScan, no record kept: orjson first, json deciding its refusals)."""
    from hpc_infer.io.data import InputScan

    s = InputScan(cfg(path, **kw))
    s.record_crcs = True
    return s, [parsed for _raw, _seg, parsed, _left in s.blocks(parallel=False)]


@pytest.mark.parametrize("read", [load_records, scan], ids=["records kept (json)", "the planner's scan (orjson first)"])
@pytest.mark.parametrize(
    "text, expect",
    [
        ('{"prompt": "a"}\n{"prompt": "b"\n', "line 2: invalid JSON (Expecting ',' delimiter, column 15)"),
        ('{"prompt": "a"}\n{"prompt": "b", }\n', "line 2: invalid JSON (Expecting property name enclosed"),
        ('{"prompt": "a"}\n{"text": "b"}\n', "line 2: no 'prompt' or 'messages' field"),
        ("", "no records"),
        ("\n\n", "no records"),
        ('{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n', "line 2: duplicate id '1'"),
        ('{"prompt": ""}\n', "line 1: 'prompt' is empty"),
        ('{"prompt": 5}\n', "line 1: 'prompt' must be a string"),
        ("[1, 2]\n", "line 1: expected a JSON object"),
        ('{"id": "a", "prompt": "x"}\n{"prompt": "y"}\n', "line 2: has no 'id' field"),
        ('{"messages": "hi"}\n', "line 1: 'messages' must be a non-empty list"),
        ('{"prompt": "a"}\n{"messages": [{"role": "user", "content": "b"}]}\n', "mixes plain prompts and chat"),
        # the first problem in the file is the one named, whichever check finds it
        ('{"id": "a", "prompt": "x"}\n{"prompt": "y"}\n{"prompt": \n', "line 2: has no 'id' field"),
        ('{"prompt": "a"}\n{"messages": [{"role": "user", "content": "b"}]}\n{\n', "line 2: mixes plain prompts"),
    ],
)
def test_malformed_jsonl_named_by_file_and_line(tmp_path, text, expect, read):
    p = write(tmp_path, "bad.jsonl", text)
    with pytest.raises(UserError) as e:
        read(cfg(p) if read is load_records else p)
    assert str(p) in str(e.value) and expect in str(e.value), str(e.value)


def test_not_utf8(tmp_path):
    p = tmp_path / "latin.jsonl"
    p.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(UserError, match="line 2: not valid UTF-8"):
        load_records(cfg(p))


def test_template_with_unknown_field(tmp_path):
    p = write(tmp_path, "m.jsonl", '{"prompt": "x"}\n')
    with pytest.raises(UserError, match=r"line 1: template data.template uses \{solution\}"):
        load_records(cfg(p, template="{prompt} {solution}"))


def test_limit(tmp_path):
    p = write(tmp_path, "a.jsonl", "".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(10)))
    assert len(load_records(cfg(p, limit=3))) == 3


def test_what_only_json_reads_is_read_as_json(tmp_path):
    """orjson refuses NaN, 1e400 and lone surrogates, and reads integers beyond 64 bits as
    floats; the planner's scan must accept exactly what json accepts, and two big integer ids
    that only differ beyond a float's precision are not duplicates."""
    lines = [
        '{"id": -9223372036854775809, "prompt": "a", "x": NaN}',
        '{"id": -9223372036854775810, "prompt": "b", "x": 1e400}',
        '{"id": 18446744073709551616, "prompt": "lone \\ud800 surrogate"}',
        '{"id": 18446744073709551617, "prompt": "\\u00e9t\\u00e9 \\ud83d\\ude00"}',
    ]
    p = write(tmp_path, "j.jsonl", "\n".join(lines) + "\n")
    s, blocks = scan(p)
    assert s.n == 4
    chars = [c for b in blocks for c in b.chars]
    assert chars == [len(json.loads(line)["prompt"]) for line in lines]
    recs = load_records(cfg(p))  # what a worker gets: json's values, big ids exact
    assert [r.id for r in recs] == [str(json.loads(line)["id"]) for line in lines]
    import zlib

    body = p.read_bytes()  # each record's CRC covers its own line, newline included
    ends = [i + 1 for i, c in enumerate(body) if c == 10]
    assert list(blocks[0].crcs) == [zlib.crc32(body[a:b]) for a, b in zip([0] + ends[:-1], ends)]
