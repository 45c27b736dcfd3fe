"""OpenAI batch files in and out, in the shape `vllm run-batch` reads and writes.

In: one request per line, `{"custom_id", "method": "POST", "url", "body"}`, url
/v1/chat/completions, /v1/completions or /v1/embeddings. The body's sampling fields
become per-record SamplingParams overrides; `custom_id` is the record id.
Out (merge.format=openai_batch): `{"id", "custom_id", "response": {"status_code",
"request_id", "body"}, "error"}` per record, in input order, body a chat.completion,
text_completion or embedding list object.
"""

from __future__ import annotations

import hashlib
from typing import Any

from ..errors import UserError

URLS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
# Body fields accepted besides SAMPLING and GUIDED: mapped below, or without effect on a batch run.
OTHER_KNOWN = {
    "model",
    "user",
    "stream",
    "metadata",
    "store",
    "logprobs",
    "top_logprobs",
    "response_format",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "encoding_format",
}
SAMPLING = {
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "n",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "min_tokens",
    "ignore_eos",
    "skip_special_tokens",
    "include_stop_str_in_output",
    "stop_token_ids",
}
GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def request_to_row(req: dict, where: str, cfg: Any) -> tuple[dict, dict]:
    """One batch request -> (a plain input row, sampling overrides)."""
    for key in ("custom_id", "body"):
        if key not in req:
            raise UserError(f"{where}: OpenAI batch request without '{key}'")
    url, body = req.get("url", "/v1/chat/completions"), req["body"]
    if url not in URLS:
        raise UserError(f"{where}: url {url!r} is not one of {', '.join(URLS)}")
    if req.get("method", "POST") != "POST":
        raise UserError(f"{where}: method {req.get('method')!r}; batch requests are POST")
    if not isinstance(body, dict):
        raise UserError(f"{where}: 'body' must be an object")
    unknown = sorted(set(body) - OTHER_KNOWN - SAMPLING - set(GUIDED) - {"messages", "prompt", "input"})
    if unknown:
        raise UserError(
            f"{where}: body field(s) {', '.join(unknown)} are not supported by hpc_infer's batch runner; "
            f"remove them (supported sampling fields: {', '.join(sorted(SAMPLING))}, max_tokens, stop, "
            f"logprobs, top_logprobs, response_format)"
        )
    row: dict[str, Any] = {cfg.id_field or "id": req["custom_id"], "url": url}
    if body.get("model"):
        row["model"] = body["model"]
    if url == "/v1/chat/completions":
        row[cfg.messages_field] = body.get("messages")
    else:
        text = body.get("prompt" if url == "/v1/completions" else "input")
        if isinstance(text, list):
            raise UserError(f"{where}: one prompt per request (got a list of {len(text)}); split it into lines")
        row[cfg.prompt_field] = text
    over: dict[str, Any] = {k: body[k] for k in SAMPLING if k in body}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        over["max_tokens"] = max_tokens
    if "stop" in body:
        over["stop"] = [body["stop"]] if isinstance(body["stop"], str) else body["stop"]
    if url == "/v1/chat/completions" and body.get("logprobs"):
        over["logprobs"] = int(body.get("top_logprobs") or 0)
    elif url == "/v1/completions" and body.get("logprobs") is not None:
        over["logprobs"] = int(body["logprobs"])
    structured = {GUIDED[k]: body[k] for k in GUIDED if k in body}
    fmt = body.get("response_format") or {}
    if fmt.get("type") == "json_schema":
        structured["json"] = (fmt.get("json_schema") or {}).get("schema")
    elif fmt.get("type") == "json_object":
        structured["json_object"] = True
    if structured:
        over["structured_outputs"] = structured
    return row, over


# vLLM's create_error_response: HTTP status -> the error's type
ERROR_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    413: "RequestEntityTooLarge",
    422: "UnprocessableEntityError",
}


def _id(prefix: str, *parts: str) -> str:
    return f"{prefix}-{hashlib.sha256(':'.join(parts).encode()).hexdigest()[:24]}"


def _bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", errors="replace"))


def _chat_logprobs(positions: list[list[dict]], top_n: int) -> dict:
    """vLLM's ChatCompletionLogProbs: per token its logprob and bytes, plus the first `top_n`
    entries of vLLM's logprob dict (none when the request asked for logprobs only)."""
    return {
        "content": [
            {
                "token": pos[0]["token"],
                "logprob": max(pos[0]["logprob"], -9999.0),
                "bytes": _bytes(pos[0]["token"]),
                "top_logprobs": [
                    {"token": p["token"], "logprob": max(p["logprob"], -9999.0), "bytes": _bytes(p["token"])}
                    for p in pos[:top_n]
                ],
            }
            for pos in positions
        ]
    }


def _completion_logprobs(positions: list[list[dict]], top_n: int) -> dict:
    """vLLM's CompletionLogProbs: parallel lists tokens / token_logprobs / top_logprobs / text_offset."""
    tokens, token_logprobs, top, offsets, offset = [], [], [], [], 0
    for pos in positions:
        token = pos[0]["token"]
        tokens.append(token)
        token_logprobs.append(max(pos[0]["logprob"], -9999.0))
        top.append({p["token"]: max(p["logprob"], -9999.0) for p in pos[:top_n]})
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def result_to_response(rec: dict, model: str, created: int, run_key: str = "") -> dict:
    """One merged record -> one line of `vllm run-batch` output.

    Ids are unique per run (`run_key`: the run directory and its planning time) and
    stable when the same run is merged again or resumed.
    """
    fields = rec.get("fields") or {}
    rid = str(rec["id"])
    if rec.get("error"):  # run-batch's failed line: a non-200 status, no body, an ErrorResponse
        err = rec["error"]
        code = int(err.get("code") or 400)
        return {
            "id": _id("vllm", run_key, rid),
            "custom_id": rec["id"],
            "response": {"status_code": code, "request_id": _id("vllm-batch", run_key, rid), "body": None},
            "error": {
                "error": {
                    "message": err.get("message", ""),
                    "type": ERROR_TYPES.get(code, "BadRequestError"),
                    "param": err.get("param"),
                    "code": code,
                }
            },
        }
    url = fields.get("url", "/v1/chat/completions" if "messages" in rec else "/v1/completions")
    model = fields.get("model") or model
    usage = {"prompt_tokens": rec.get("prompt_tokens", 0), "total_tokens": rec.get("prompt_tokens", 0)}
    if url == "/v1/embeddings":
        body: dict[str, Any] = {
            "id": _id("embd", run_key, rid),
            "object": "list",
            "created": created,
            "model": model,
            "usage": usage,
            "data": [{"object": "embedding", "index": 0, "embedding": rec.get("embedding")}],
        }
    else:
        usage["completion_tokens"] = rec.get("output_tokens", 0)
        usage["total_tokens"] += usage["completion_tokens"]
        chat = url == "/v1/chat/completions"
        top_n = int((rec.get("sampling") or {}).get("logprobs") or 0)
        choices = []
        for i, o in enumerate(rec.get("outputs") or []):
            c: dict[str, Any] = {
                "index": i,
                "logprobs": None,
                "finish_reason": o.get("finish_reason"),
                "stop_reason": o.get("stop_reason"),
            }
            if chat:
                c["message"] = {"role": "assistant", "content": o.get("text"), "tool_calls": []}
            else:
                c["text"] = o.get("text")
            if o.get("logprobs"):
                c["logprobs"] = (_chat_logprobs if chat else _completion_logprobs)(o["logprobs"], top_n)
            choices.append(c)
        body = {
            "id": _id("chatcmpl" if chat else "cmpl", run_key, rid),
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": model,
            "choices": choices,
            "usage": usage,
            "system_fingerprint": None,
        }
    return {
        "id": _id("vllm", run_key, rid),
        "custom_id": rec["id"],
        "response": {"status_code": 200, "request_id": _id("vllm-batch", run_key, rid), "body": body},
        "error": None,
    }
