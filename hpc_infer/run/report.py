"""`hpc-infer report RUN [RUN ...]`: one self-contained HTML page a researcher would rather
look at than read summary.json.

For one run: the metrics table (overall and per group: pass@1, pass@k, maj@k with standard
errors), reward by group as bars, the output-length histogram with the max_tokens line,
finish reasons, errors by type, throughput over time (the run's timeline), and example
records of each CS336 format/answer category. For several runs (or a Hydra sweep folder,
whose runs `launch` lists in its runs.txt): one comparison table and the records on which
their grades disagree. Charts are matplotlib PNGs inlined as data: URIs, so the page opens
from disk with no network and no script.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections import Counter
from pathlib import Path

from ..errors import UserError

STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}img{max-width:100%;display:block;margin:1em 0}
pre{white-space:pre-wrap;background:#f8f8f8;padding:8px;font-size:12px}h2{margin-top:2em}.muted{color:#777}"""


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _img(src: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="{src}">'


def _fmt(m: dict | None) -> str:
    if not isinstance(m, dict) or not isinstance(m.get("mean"), (int, float)):
        return ""
    se = m.get("se")
    return f"{m['mean']:.3f}" + (f" ± {se:.3f}" if isinstance(se, (int, float)) else "")


def _metric_keys(metrics: dict) -> list[str]:
    keys = [
        k for k in metrics if isinstance(k, str) and k.startswith(("pass@", "maj@")) and k[k.index("@") + 1 :].isdigit()
    ]
    return sorted(keys, key=lambda k: (k.split("@")[0] != "pass", int(k.split("@")[1])))


RESULT_NAMES = ("results.jsonl", "results.parquet", "results.openai_batch.jsonl", "results.partial.jsonl")


def inside(root: Path, named: object, allowed: tuple[str, ...]) -> str | None:
    """A file a run's summary names, as a name inside the run (one of `allowed`), or None: an
    absolute path elsewhere, a `..`, a link is never followed out of the pinned run."""
    if not isinstance(named, str) or not named:
        return None
    p = Path(named)
    if p.is_absolute():
        if p.parent != root:
            return None
        p = Path(p.name)
    return p.name if str(p) in allowed else None


def load(root: Path) -> dict:
    """What a report shows of one run: its summary, settings and result rows, each read through
    the run's pinned handle under the trust rule (the caller's own run, or a teammate's read
    as data), files named inside it only."""
    from ..rundir import trust

    fs = trust.open_dir(root, "report", need=trust.SHARED)
    if not fs.exists("summary.json"):
        raise UserError(f"{root}: no summary.json (merge the run first: hpc-infer merge {root})")
    try:
        summary, spec = json.loads(fs.read("summary.json")), json.loads(fs.read("worker.json"))
    except (OSError, ValueError) as e:
        raise UserError(f"{root}: summary.json or worker.json unreadable ({e}); merge the run again") from None
    if not isinstance(summary, dict) or not isinstance(spec, dict):
        raise UserError(f"{root}: summary.json is not a summary; merge the run again")
    name = inside(root, summary.get("results"), RESULT_NAMES)
    rows: list[dict] = []
    if name and name.endswith(".parquet") and fs.exists(name):
        import pyarrow.parquet as pq

        for r in pq.read_table(io.BytesIO(fs.read(name))).to_pylist():
            for key in ("fields", "messages", "input", "error"):
                if isinstance(r.get(key), str):
                    try:
                        r[key] = json.loads(r[key])
                    except ValueError:
                        pass
            rows.append(r)
    elif name and fs.exists(name):
        rows = [json.loads(line) for line in fs.read(name).splitlines() if line.strip()]
    timeline = inside(root, summary.get("timeline"), ("timeline.png",))
    png = fs.read(timeline) if timeline and fs.exists(timeline) else None
    return {"root": root, "name": root.name, "summary": summary, "spec": spec, "rows": rows, "timeline": png}


def _metrics_table(metrics: dict) -> str:
    keys = _metric_keys(metrics)
    head = "".join(f"<th>{k}</th>" for k in keys)
    out = [
        f'<table id="metrics"><tr><th class="l">group</th><th>records</th>{head}</tr>',
        f'<tr><td class="l">all</td><td>{html.escape(str(metrics.get("records", 0)))}</td>'
        + "".join(f'<td data-metric="{k}">{_fmt(metrics.get(k))}</td>' for k in keys)
        + "</tr>",
    ]
    for field, groups in (metrics.get("groups") or {}).items():
        for value, m in groups.items():
            out.append(
                f'<tr><td class="l">{html.escape(str(field))} = {html.escape(str(value))}</td><td>'
                f"{html.escape(str(m.get('records', 0)))}</td>"
                + "".join(f"<td>{_fmt(m.get(k))}</td>" for k in keys)
                + "</tr>"
            )
    return "".join(out) + "</table>"


def _bars(labels: list[str], values: list[float], errors: list[float], title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(labels) + 2), 3))
    ax.bar(range(len(labels)), values, yerr=errors, color="#4c72b0", capsize=3)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_title(title)
    ax.set_ylim(0, max([1.0] + [v + e for v, e in zip(values, errors)]))
    return _png(fig)


def _histogram(lengths: list[int], max_tokens: int | None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.hist(lengths or [0], bins=40, color="#55a868")
    if max_tokens:
        ax.axvline(max_tokens, color="#c44e52", linestyle="--", label=f"max_tokens {max_tokens}")
        ax.legend()
    ax.set_xlabel("output tokens")
    ax.set_ylabel("outputs")
    ax.set_title("output length")
    return _png(fig)


def _counts_table(counts: dict, what: str, table_id: str) -> str:
    rows = "".join(
        f'<tr><td class="l">{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>'
        for k, v in sorted(counts.items(), key=lambda kv: -kv[1] if isinstance(kv[1], (int, float)) else 0)
    )
    return f'<table id="{table_id}"><tr><th class="l">{what}</th><th>count</th></tr>{rows or "<tr><td>none</td><td>0</td></tr>"}</table>'


def _number(value: object, where: str) -> float:
    """A figure read back from a summary: a number, or the report refuses the run by name."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"report: {where} is {type(value).__name__}, not a number; merge the run again")
    return value


def one_run(r: dict) -> str:
    s, spec, rows = r["summary"], r["spec"], r["rows"]
    for key in ("records", "records_expected", "output_tokens", "output_tokens_per_s", "wall_s"):
        s[key] = _number(s.get(key), f"{r['name']}/summary.json: {key}")
    post = s.get("postprocess") or {}
    metrics = post.get("metrics") or {}
    max_tokens = (spec.get("sampling") or {}).get("max_tokens")
    outputs = [o for row in rows for o in (row.get("outputs") or [])]
    lengths = [int(o.get("num_tokens") or 0) for o in outputs]
    finish = Counter(str(o.get("finish_reason")) for o in outputs)
    cut = finish.get("length", 0)
    parts = [
        f"<h1>{html.escape(r['name'])}</h1>",
        f'<p class="muted">{s["records"]}/{s["records_expected"]} records, {s["output_tokens"]:,} output tokens, '
        f"{s['output_tokens_per_s']:,.0f} tok/s over {s['wall_s']:.0f} s; sampling "
        f"{html.escape(json.dumps(spec.get('sampling')))}</p>",
    ]
    engine = {
        "prefix cache": (
            f"{s['prefix_cache']['hit_rate']:.1%} of {s['prefix_cache']['prompt_tokens']:,} prompt tokens "
            "found in vLLM's prefix cache"
            if s.get("prefix_cache")
            else "not reported by the engine"
        ),
        "planning": (
            f"prefix-aware: {s['planning']['records_in_shared_groups']:,} records in "
            f"{s['planning']['groups']:,} groups sharing their first {s['planning']['prefix_chars']:,} characters"
            if s.get("planning")
            else "input order"
        ),
        "engine settings": json.dumps(s["engine_settings"]) if s.get("engine_settings") else "vLLM's defaults",
        "run": str(r["root"]),
    }
    rows_html = "".join(
        f'<tr><td class="l">{k}</td><td class="l">{html.escape(v)}</td></tr>' for k, v in engine.items()
    )
    parts += ["<h2>Engine</h2>", f'<table id="engine">{rows_html}</table>']
    if metrics:
        parts += [
            "<h2>Metrics</h2>",
            _metrics_table(metrics),
            f'<p class="muted">score: {html.escape(str(metrics.get("score")))} (hook {html.escape(post["target"])}); '
            "pass@k: the unbiased estimator; ± one standard error over records</p>",
        ]
        for field, groups in (metrics.get("groups") or {}).items():
            labels = list(groups)
            parts.append(
                _img(
                    _bars(
                        labels,
                        [groups[v]["pass@1"]["mean"] for v in labels],
                        [groups[v]["pass@1"]["se"] or 0.0 for v in labels],
                        f"pass@1 by {field}",
                    ),
                    f"pass@1 by {field}",
                )
            )
        if metrics.get("categories"):
            parts += ["<h2>Format and answer</h2>", _counts_table(metrics["categories"], "category", "categories")]
            for key, examples in (metrics.get("examples") or {}).items():
                parts.append(f"<h3>{html.escape(key)}</h3>")
                parts += [
                    f"<p><b>{html.escape(str(e['id']))}</b></p><pre>{html.escape(e['text'])}</pre>" for e in examples
                ]
    elif post:
        parts += [
            "<h2>Hook</h2>",
            _counts_table({k: round(v, 4) for k, v in post.get("means", {}).items()}, "mean", "hook-means"),
        ]
    parts += [
        "<h2>Outputs</h2>",
        _img(_histogram(lengths, max_tokens), "output length histogram"),
        f'<p class="muted">{cut} of {len(outputs)} outputs cut by max_tokens (finish_reason length)</p>',
        _counts_table(dict(finish), "finish reason", "finish-reasons"),
        "<h2>Errors</h2>",
        _counts_table(s.get("error_types") or {}, "error type", "errors"),
    ]
    if s.get("slowest_chunks"):
        cols = ("chunk", "worker", "records", "output_tokens", "seconds", "output_tokens_per_s")
        head = "".join(f"<th>{c.replace('_', ' ')}</th>" for c in cols)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(row.get(c)))}</td>" for c in cols) + "</tr>"
            for row in s["slowest_chunks"]
        )
        parts += ["<h2>Slowest chunks</h2>", f'<table id="slowest-chunks"><tr>{head}</tr>{body}</table>']
    if r.get("timeline") and r["timeline"].startswith(b"\x89PNG"):
        src = "data:image/png;base64," + base64.b64encode(r["timeline"]).decode()
        parts += ["<h2>Throughput over time</h2>", _img(src, "timeline: chunks per worker over time")]
    return "\n".join(parts)


def _grade(row: dict) -> float | None:
    outputs = row.get("outputs") or []
    scores = [o.get("answer_reward") for o in outputs if o.get("answer_reward") is not None]
    return sum(scores) / len(scores) if scores else None


def compare(runs: list[dict]) -> str:
    keys = sorted(
        {k for r in runs for k in _metric_keys((r["summary"].get("postprocess") or {}).get("metrics") or {})},
        key=lambda k: (k.split("@")[0] != "pass", int(k.split("@")[1])),
    )
    head = "".join(f"<th>{k}</th>" for k in keys)
    rows = []
    for r in runs:
        m = (r["summary"].get("postprocess") or {}).get("metrics") or {}
        rows.append(
            f'<tr><td class="l">{html.escape(r["name"])}</td><td>{r["summary"]["records"]}</td>'
            f"<td>{r['summary']['output_tokens_per_s']:,.0f}</td>"
            + "".join(f"<td>{_fmt(m.get(k))}</td>" for k in keys)
            + "</tr>"
        )
    table = (
        f'<table id="comparison"><tr><th class="l">run</th><th>records</th><th>tok/s</th>{head}</tr>'
        + "".join(rows)
        + "</table>"
    )
    grades = [{row.get("id"): (_grade(row), row) for row in r["rows"]} for r in runs]
    shared = set.intersection(*(set(g) for g in grades)) if grades else set()
    differ = sorted((i for i in shared if len({g[i][0] for g in grades}) > 1), key=str)
    lines = []
    for i in differ[:50]:
        cells = "".join(
            f"<td>{'' if g[i][0] is None else f'{g[i][0]:.2f}'}<br><span class='muted'>"
            f"{html.escape(', '.join(str(o.get('extracted')) for o in g[i][1].get('outputs') or []))}"
            f"</span></td>"
            for g in grades
        )
        lines.append(f'<tr><td class="l">{html.escape(str(i))}</td>{cells}</tr>')
    names = "".join(f"<th>{html.escape(r['name'])}</th>" for r in runs)
    disagree = (
        f"<h2>Records the runs grade differently ({len(differ)} of {len(shared)})</h2>"
        f'<table id="disagreements"><tr><th class="l">id</th>{names}</tr>{"".join(lines)}</table>'
    )
    return f"<h1>{len(runs)} runs side by side</h1>{table}{disagree}"


def runs_of(path: Path) -> list[Path]:
    """A run directory itself, or the runs a Hydra sweep folder lists (runs.txt, written by
    each launch of the sweep through the folder's pinned handle)."""
    if (path / "manifest.json").exists():
        return [path]
    if (path / "runs.txt").exists():
        from ..rundir import trust

        fs = trust.open_dir(path, "sweep folder", trust.SHARED)  # judged, then runs.txt read through it
        try:
            listed = fs.read("runs.txt").decode(errors="replace")
        finally:
            fs.close()
        # each run it names is then read under the rule like any other (load)
        return [Path(p) for p in dict.fromkeys(listed.split()) if p.startswith("/")]
    raise UserError(f"{path}: neither a run directory (manifest.json) nor a sweep folder (runs.txt)")


def _section(fn, r: dict) -> str:
    """One run's part of the page; a summary of another shape than merge writes is refused
    by name, never half-rendered."""
    try:
        return fn(r)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise UserError(
            f"report: {r['root']}/summary.json does not have the shape merge writes ({type(e).__name__}: {e}); "
            f"merge the run again (hpc-infer merge {r['root']})"
        ) from None


def write_report(paths: list[Path], out: Path | None = None) -> Path:
    roots = [r for p in paths for r in runs_of(Path(p).expanduser().resolve())]
    if not roots:
        raise UserError("hpc-infer report: give one or more run directories (or a sweep folder)")
    runs = [load(r) for r in roots]
    if len(runs) > 1:
        body = _section(lambda _: compare(runs), runs[0]) + "".join(f"<hr>{_section(one_run, r)}" for r in runs)
    else:
        body = _section(one_run, runs[0])
    page = (
        f'<!doctype html><html><head><meta charset="utf-8"><title>hpc_infer report: '
        f"{html.escape(', '.join(r['name'] for r in runs))}</title><style>{STYLE}</style></head>"
        f"<body>{body}</body></html>"
    )
    target = Path(out or (roots[0] / "report.html" if len(roots) == 1 else Path(paths[0]).expanduser() / "report.html"))
    return write_page(target.expanduser().absolute(), page.encode(), runs)


def write_page(target: Path, page: bytes, runs: list[dict]) -> Path:
    """The page into a folder the caller owns and nobody else can write (else refused, naming
    --out), as a new file (never through a link), readable as the strictest of its runs allow:
    it inlines their records."""
    from ..rundir import UMASKS, trust

    folder = trust.open_dir(
        target.parent,
        "report",
        trust.OWN,
        fix="write it into a folder of your own: hpc-infer report RUN --out DIR/report.html",
    )
    perms = [r["spec"].get("permissions") for r in runs]
    umask = UMASKS["private"] if "private" in perms or None in perms else UMASKS["group"]
    folder.replace(target.name, page)
    fd = folder.open_file(target.name)
    try:
        os.fchmod(fd, 0o666 & ~umask)
    finally:
        os.close(fd)
    return target


def headline(metrics: dict) -> str:
    """pass@1 0.250 ± 0.097, pass@4 0.400 ± 0.112, maj@4 0.300 ± 0.105 (20 records)."""
    keys = _metric_keys(metrics)
    errors = metrics.get("errors") or 0
    failed = f", {errors} of them error records, counted as failed" if errors else ""
    return ", ".join(f"{k} {_fmt(metrics[k])}" for k in keys) + f" ({metrics.get('records', 0)} records{failed})"
