"""A deterministic engine with no model: for protocol tests and benches (worker/protocol.py).

Chosen by the worker when `HPC_INFER_FAKE_ENGINE` holds its settings as JSON (never
through a run's config: a run is never fake by accident). Each record generates
`max_tokens` tokens (the run's or the record's sampling; `tokens` overrides), at most
`max_num_seqs` requests run at once, each step advances every running request by one
token and takes `step_s` seconds (plus `step_per_seq_s` for each running request: a real
engine's decode step grows with its batch, bench/engine_model.json): a known rate of
max_num_seqs / step_s tokens per second. Settings:

    {"step_s": 0.002, "step_per_seq_s": 0.0, "max_num_seqs": 64, "tokens": null, "start_s": 0.0,
     "fail_ids": ["r3"], "die_ids": ["r7"], "slow": {"worker-id-part": 5.0}}

`fail_ids` come back as error records (what vLLM refuses); a record in `die_ids` makes
step() raise as vLLM's EngineDeadError does (a poison record); `slow` multiplies step_s
for workers whose id contains the key (a straggler); `lengths` {"median", "sigma", "max",
"salt"} gives each record its own log-normal output length, drawn from its id and the salt
(the same on every worker: heavy-tailed outputs for the balance bench; another salt,
another draw); `lean` returns rows of id, index, chunk, text and token counts alone (no
copy of the input record, no `outputs` list): the 10,000-worker simulation holds every
worker's finished, unpublished rows in one process.
Standard library only.
"""

from __future__ import annotations

import json
import os
from collections import deque
from typing import Any

from ..rundir import clock
from .protocol import error_result

ENV = "HPC_INFER_FAKE_ENGINE"


class FakeEngineDied(RuntimeError):
    engine_died = True  # what rundir/isolate.engine_died looks for


class FakeRefused(ValueError):
    kind = "fake_refused"
    status = 400


def settings() -> dict | None:
    raw = os.environ.get(ENV)
    return json.loads(raw) if raw else None


class FakeEngine:
    def __init__(self, conf: dict, worker_id: str = ""):
        self.step_s = float(conf.get("step_s", 0.002))
        self.step_per_seq_s = float(conf.get("step_per_seq_s", 0.0))
        for part, factor in (conf.get("slow") or {}).items():
            if part in worker_id:
                self.step_s *= float(factor)
                self.step_per_seq_s *= float(factor)
        self.max_num_seqs = int(conf.get("max_num_seqs", 64))
        self.tokens = conf.get("tokens")
        self.fail_ids = set(map(str, conf.get("fail_ids") or []))
        self.lengths = conf.get("lengths")
        self.die_ids = set(map(str, conf.get("die_ids") or []))
        self.lean = bool(conf.get("lean"))
        self.generating_tokens = 0
        self._waiting: deque[list] = deque()  # [record, tokens wanted, tokens so far]
        self._running: list[list] = []
        self._errors: list[dict] = []
        if conf.get("start_s"):
            clock.sleep(float(conf["start_s"]))  # an engine's start

    def _length(self, rid: str) -> int:
        import random
        import zlib

        L = self.lengths
        g = random.Random(zlib.crc32((str(L.get("salt", "")) + rid).encode()))  # another salt, another draw
        return max(
            1, min(int(L.get("max", 4096)), round(g.lognormvariate(0, float(L.get("sigma", 1.0))) * L["median"]))
        )

    @property
    def unfinished(self) -> int:
        return len(self._waiting) + len(self._running) + len(self._errors)

    def running_tokens(self) -> list[tuple[int, int | None]]:
        """Each running request's tokens so far and its cap (never its drawn length)."""
        cap = int(self.lengths.get("max", 4096)) if self.lengths else None
        return [(have, cap if cap is not None else want) for _, want, have in self._running]

    def add(self, records: list[dict], sampling: dict[str, Any] | None, seed: int | None) -> None:
        for r in records:
            r.pop("too_long", None)
            if str(r.get("id")) in self.fail_ids:
                self._errors.append(error_result(r, FakeRefused(f"refused by the fake engine: {r.get('id')}")))
                continue
            want = (
                self.tokens or (r.get("sampling") or {}).get("max_tokens") or (sampling or {}).get("max_tokens") or 16
            )
            if self.lengths:
                want = self._length(str(r.get("id")))
            self._waiting.append([r, int(want), 0])

    def step(self) -> list[dict]:
        done, self._errors = self._errors, []
        while self._waiting and len(self._running) < self.max_num_seqs:
            self._running.append(self._waiting.popleft())
        if not self._running:
            return done
        clock.sleep(self.step_s + self.step_per_seq_s * len(self._running))
        for req in self._running:
            if str(req[0].get("id")) in self.die_ids:
                raise FakeEngineDied(f"the fake engine died on record {req[0].get('id')}")
            req[2] += 1
        self.generating_tokens += len(self._running)
        still = []
        for record, want, have in self._running:
            if have >= want:
                self.generating_tokens -= have
                done.append(self._result(record, have))
            else:
                still.append([record, want, have])
        self._running = still
        return done

    def _result(self, record: dict, have: int) -> dict:
        """A finished record's row: the input's fields, the text, the token counts and
        vLLM's `outputs` list; with `lean`, the id, index and chunk alone beside them."""
        text = f"fake {record.get('id')} {have}"
        counts = {"text": text, "prompt_tokens": len(str(record.get("prompt") or "")) // 4, "output_tokens": have}
        if self.lean:
            return {k: record.get(k) for k in ("id", "index", "chunk")} | counts
        return dict(
            record,
            **counts,
            outputs=[{"text": text, "finish_reason": "length", "stop_reason": None, "num_tokens": have}],
        )

    def abort(self, chunk_id: int) -> int:
        n = 0
        for queue in (self._waiting, self._running):
            keep = [q for q in queue if q[0].get("chunk") != chunk_id]
            n += len(queue) - len(keep)
            self.generating_tokens -= sum(q[2] for q in queue if q[0].get("chunk") == chunk_id)
            queue.clear()
            queue.extend(keep)
        self._errors = [r for r in self._errors if r.get("chunk") != chunk_id]
        return n
