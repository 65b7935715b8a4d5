"""The report a person reads: one self-contained HTML page rendered from a report's JSON.

``render_html(report, path)`` takes a Report or its ``to_dict()`` (an old ``report.json`` read
back works the same), so ``onnxcomp report REPORT.json --html FILE`` can re-render any report.
The page holds everything: CSS inline, pictures as PNG ``data:`` URIs, no script, no URL to
anywhere. Every value from the report is HTML-escaped; images are taken only as
``data:image/png;base64`` strings.

Sections, each only where the report has the data:
summary (size, latency and fidelity ratios, the ``--min-cosine`` verdict); passes (what each
touched and skipped, and why); per-layer quantization harm (SQNR and, when measured, each layer's
output cosine alone; float-kept layers marked); parameters and bytes by op type and dtype before
and after (``models[role]["breakdown"]``); latency per model, provider and threads; fidelity per
output (histogram of ``per_sample_cosine``); dual encoders (similarity matrices side by side,
retrieval agreement); OCR (the lines whose text changed, with their images); notes; and for
``onnxcomp search`` (a ``search`` key): constraints, the chosen model, the Pareto plot and
front, the fixed recipes and every trial.

Pictures need matplotlib (the ``[report]`` extra); without it the tables are all there and the
page says which pictures are missing and how to get them.
"""

from __future__ import annotations

import html
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from onnxcomp import report_plots

_PNG_URI = re.compile(r"data:image/png;base64,[A-Za-z0-9+/=]+")
EXTRA_HINT = "pip install 'onnxcomp[report]'"

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#222;
 max-width:1100px;margin:0 auto;padding:16px 24px;background:#fff}
h1{font-size:22px;margin:4px 0}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:15px;margin:16px 0 6px}
.env{color:#666;font-size:12px}
table{border-collapse:collapse;margin:6px 0 10px;font-size:13px}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f4f6f8}td.n{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:10px 0}
.card{border:1px solid #ddd;border-radius:6px;padding:8px 12px;min-width:150px}
.card .v{font-size:20px;font-weight:600}.card .l{color:#666;font-size:12px}
.verdict{padding:8px 12px;border-radius:6px;margin:10px 0;font-weight:600}
.pass{background:#e6f4ea;color:#1e6b34}.fail{background:#fce8e6;color:#a50e0e}
.none{background:#f1f3f4;color:#555}
.missing{background:#fff8e1;border:1px solid #f0d36b;padding:6px 10px;border-radius:6px}
img.plot{max-width:100%;display:block;margin:6px 0}
img.line{height:32px;image-rendering:auto}
.kept{color:#b5530f;font-weight:600}.bad{color:#a50e0e}
details{margin:4px 0}summary{cursor:pointer}
code{font-size:12px}
"""


# --- small builders ---------------------------------------------------------------------------

def _esc(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e6:
            return f"{value:.4g}"
        return f"{value:.3e}"
    if isinstance(value, int):
        return f"{value:,}"
    return "" if value is None else str(value)


def _table(headers: list[str], rows: list[list[Any]], raw_columns: tuple[int, ...] = ()) -> str:
    """An HTML table; numbers right-aligned; cells in ``raw_columns`` are trusted HTML."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for i, value in enumerate(row):
            if i in raw_columns:
                cells.append(f"<td>{value}</td>")
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                cells.append(f'<td class="n">{_esc(_fmt(value))}</td>')
            else:
                cells.append(f"<td>{_esc(_fmt(value))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _img(uri: str, alt: str, css: str = "plot") -> str:
    if not isinstance(uri, str) or not _PNG_URI.fullmatch(uri):
        return f"<em>({_esc(alt)}: not a PNG data URI, left out)</em>"
    return f'<img class="{css}" alt="{_esc(alt)}" src="{uri}">'


class _Page:
    """Collects sections, and the pictures that could not be drawn without matplotlib."""

    def __init__(self, plots: bool):
        self.plots = plots
        self.parts: list[str] = []
        self.missing: list[str] = []

    def add(self, text: str) -> None:
        self.parts.append(text)

    def picture(self, what: str, draw) -> None:
        if not self.plots:
            self.missing.append(what)
            self.add(f'<p class="missing">Picture "{_esc(what)}" needs matplotlib: '
                     f"<code>{_esc(EXTRA_HINT)}</code></p>")
            return
        self.add(_img(draw(), what))


# --- sections ---------------------------------------------------------------------------------

def _ratio(candidate: Any, reference: Any) -> float | None:
    if isinstance(candidate, (int, float)) and isinstance(reference, (int, float)) and reference:
        return candidate / reference
    return None


def _card(value: str, label: str) -> str:
    return f'<div class="card"><div class="v">{_esc(value)}</div><div class="l">{_esc(label)}' \
           "</div></div>"


def _summary(page: _Page, report: dict[str, Any]) -> None:
    page.add("<h2>Summary</h2>")
    for verdict in report.get("verdicts") or []:
        page.add(f'<div class="verdict fail">{_esc(verdict)}</div>')
    fidelity = report.get("fidelity") or {}
    gate = fidelity.get("min_cosine")
    if fidelity and gate is not None:
        passed = fidelity.get("passed", True)
        page.add(f'<div class="verdict {"pass" if passed else "fail"}">'
                 f'{"Passed" if passed else "FAILED"}: every output\'s mean cosine must be '
                 f"&ge; {_esc(gate)}</div>")
    elif fidelity:
        page.add('<div class="verdict none">No fidelity gate (--min-cosine) was set</div>')
    cards = []
    models = report.get("models") or {}
    bench = report.get("bench") or {}
    sizes = bench.get("models") or []
    if len(sizes) >= 2 and _ratio(sizes[1]["bytes"], sizes[0]["bytes"]) is not None:
        ratio = _ratio(sizes[1]["bytes"], sizes[0]["bytes"])
        cards.append(_card(f"{ratio:.3f}x", f"file size ({sizes[1]['bytes'] / 1e6:.2f} MB vs "
                                            f"{sizes[0]['bytes'] / 1e6:.2f} MB)"))
    elif _ratio((models.get("candidate") or {}).get("weight_bytes"),
                (models.get("reference") or {}).get("weight_bytes")) is not None:
        ref, cand = models["reference"]["weight_bytes"], models["candidate"]["weight_bytes"]
        cards.append(_card(f"{_ratio(cand, ref):.3f}x",
                           f"weight bytes ({cand / 1e6:.2f} MB vs {ref / 1e6:.2f} MB)"))
    for r in bench.get("results") or []:
        if r.get("model_index", 0) >= 1 and isinstance(r.get("latency_ratio"), (int, float)):
            cards.append(_card(f"{r['latency_ratio']:.3f}x",
                               f"p50 latency, {_short_model(r)}, "
                               f"{r['provider'].replace('ExecutionProvider', '')}, "
                               f"{r['threads']} thread(s)"))
    for name, out in (fidelity.get("outputs") or {}).items():
        cards.append(_card(f"{out['cosine_mean']:.5f}", f"mean cosine, {name}"))
    task = fidelity.get("task") or {}
    for key, value in (task.get("candidate") or {}).items():
        ref = (task.get("reference") or {}).get(key)
        if isinstance(value, (int, float)) and isinstance(ref, (int, float)):
            cards.append(_card(f"{value:.4g}", f"{key} (reference {ref:.4g})"))
    retrieval = fidelity.get("retrieval") or {}
    if retrieval:
        cards.append(_card(f"{retrieval['a_to_b_agreement']:.3f}",
                           f"retrieval agreement {retrieval['a']} -> {retrieval['b']}"))
    if cards:
        page.add('<div class="cards">' + "".join(cards) + "</div>")


def _short_model(result: dict[str, Any]) -> str:
    return str(result.get("model", ""))


def _passes(page: _Page, passes: list[dict[str, Any]]) -> None:
    page.add("<h2>Passes</h2>")
    rows = [[p["name"], p.get("modified"), len(p.get("touched") or []),
             len(p.get("skipped") or []), p.get("params_before"), p.get("params_after"),
             p.get("bytes_before"), p.get("bytes_after"), round(p.get("seconds") or 0.0, 2)]
            for p in passes]
    page.add(_table(["pass", "modified", "touched", "skipped", "params before", "params after",
                     "bytes before", "bytes after", "seconds"], rows))
    for index, p in enumerate(passes, 1):
        touched, skipped, notes = p.get("touched") or [], p.get("skipped") or [], p.get("notes")
        if not (touched or skipped or notes):
            continue
        body = []
        if notes:
            body.append("<ul>" + "".join(f"<li>{_esc(n)}</li>" for n in notes) + "</ul>")
        if touched:
            body.append(f"<p>touched ({len(touched)}): " + ", ".join(
                f"<code>{_esc(t)}</code>" for t in touched) + "</p>")
        if skipped:
            body.append(_table(["skipped", "why"], [list(s)[:2] for s in skipped]))
        page.add(f"<details><summary>{index}. {_esc(p['name'])}: {len(touched)} touched, "
                 f"{len(skipped)} skipped</summary>{''.join(body)}</details>")


def _layer_harm(page: _Page, passes: list[dict[str, Any]]) -> None:
    for p in passes:
        details = p.get("details") or {}
        sqnr = details.get("sqnr")
        if not sqnr:
            continue
        kept = set(details.get("kept_float") or [])
        alone = {r["node"]: r["output_cosine_alone"] for r in details.get("sensitivity") or []}
        page.add(f"<h2>Per-layer quantization harm ({_esc(p['name'])})</h2>")
        cosine = details.get("output_cosine") or {}
        text = "; ".join(f"{_esc(k)} {v:.5f}" for k, v in cosine.items()
                         if isinstance(v, (int, float)))
        if text:
            after = details.get("output_cosine_after")
            page.add(f"<p>Model output cosine with every layer quantized: {text}"
                     + (f"; after keeping {len(kept)} layers float: {after:.5f}"
                        if isinstance(after, (int, float)) else "") + ".</p>")
        page.add("<p>SQNR of each quantized layer's output inside the quantized model (it "
                 "carries the error of the layers upstream); " +
                 ("beside it, the model output cosine with that layer alone quantized. "
                  if alone else "") +
                 (f'<span class="kept">{len(kept)} layers kept float</span> are marked.'
                  if kept else "") + "</p>")
        page.picture(f"per-layer SQNR ({p['name']})",
                     lambda s=sqnr, k=kept, a=alone: report_plots.layer_harm(s, k, a or None))
        rows = []
        for r in sorted(sqnr, key=lambda r: (r["sqnr_db"] is None, r["sqnr_db"])):
            status = '<span class="kept">kept float</span>' if r["node"] in kept else "quantized"
            rows.append([_esc(r["node"]), r["sqnr_db"], alone.get(r["node"]), status])
        page.add(f"<details><summary>all {len(rows)} layers</summary>"
                 + _table(["layer", "SQNR dB", "output cosine alone", ""], rows, (0, 3))
                 + "</details>")


def _breakdown(page: _Page, models: dict[str, Any]) -> None:
    tables = {role: info["breakdown"] for role, info in models.items()
              if isinstance(info, dict) and isinstance(info.get("breakdown"), dict)}
    if not tables:
        return
    page.add("<h2>Parameters and bytes by op type and dtype</h2>")
    before = tables.get("reference") or next(iter(tables.values()))
    after = tables.get("candidate")
    page.picture("bytes by op type and dtype",
                 lambda: report_plots.breakdown(before["rows"], after["rows"] if after else None))
    roles = list(tables)

    def grouped(field: str) -> str:
        sums: dict[str, dict[str, list[int]]] = {}
        for role in roles:
            for r in tables[role]["rows"]:
                entry = sums.setdefault(r[field], {})
                totals = entry.setdefault(role, [0, 0])
                totals[0] += r["params"]
                totals[1] += r["bytes"]
        rows = []
        for key, entry in sorted(sums.items(), key=lambda kv: -max(v[1] for v in
                                                                    kv[1].values())):
            rows.append([key] + [v for role in roles for v in entry.get(role, [None, None])])
        rows.append(["total"] + [v for role in roles for v in (tables[role]["params"],
                                                                tables[role]["bytes"])])
        headers = [field] + [f"{what} {role}" for role in roles for what in ("params", "bytes")]
        return _table(headers, rows)

    page.add('<div class="cards">' + grouped("op") + grouped("dtype") + "</div>")
    index = {role: {(r["op"], r["dtype"]): r for r in t["rows"]} for role, t in tables.items()}
    keys = sorted({key for rows in index.values() for key in rows},
                  key=lambda k: -max(index[r].get(k, {}).get("bytes", 0) for r in roles))
    rows = []
    for key in keys:
        row: list[Any] = [*key]
        for role in roles:
            entry = index[role].get(key)
            row += [entry["params"], entry["bytes"]] if entry else [None, None]
        rows.append(row)
    headers = ["op", "dtype"] + [f"{what} {role}" for role in roles for what in ("params",
                                                                                 "bytes")]
    page.add(f"<details><summary>by op type and dtype ({len(rows)} rows)</summary>"
             + _table(headers, rows) + "</details>")


def _latency(page: _Page, bench: dict[str, Any]) -> None:
    results = bench.get("results") or []
    if not results:
        return
    page.add("<h2>Latency</h2>")
    page.picture("latency per model, provider and threads",
                 lambda: report_plots.latency(results))
    memory = {(m["model"], m["provider"]): m for m in bench.get("memory") or []}
    sizes = {m["name"]: m for m in bench.get("models") or []}
    rows = []
    for r in results:
        mem = memory.get((r["model"], r["provider"]), {})
        rows.append([r["model"], r["provider"].replace("ExecutionProvider", ""), r["threads"],
                     r.get("runs"), r["p50_ms"], r["p90_ms"], r["p99_ms"], r.get("throughput"),
                     r.get("latency_ratio"), sizes.get(r["model"], {}).get("bytes"),
                     mem.get("session_peak_mb")])
    page.add(_table(["model", "provider", "threads", "runs", "p50 ms", "p90 ms", "p99 ms",
                     "samples/s", "p50 ratio", "bytes", "session peak MB"], rows))
    page.add(f"<p>batch {_esc(bench.get('batch'))}, {_esc(bench.get('warmup'))} warm-up runs, "
             f"order: {_esc(bench.get('order'))}; ratios against the first model.</p>")


def _fidelity(page: _Page, fidelity: dict[str, Any]) -> None:
    outputs = fidelity.get("outputs") or {}
    if not outputs:
        return
    page.add("<h2>Fidelity per output</h2>")
    page.add(f"<p>reference <code>{_esc(fidelity.get('reference'))}</code>, candidate "
             f"<code>{_esc(fidelity.get('candidate'))}</code>, data "
             f"<code>{_esc(fidelity.get('data'))}</code> ({_esc(fidelity.get('batches'))} "
             "batches)</p>")
    gate = fidelity.get("min_cosine")
    rows = []
    for name, out in outputs.items():
        row = [name, "x".join(str(d) for d in out.get("shape") or []), out.get("samples"),
               out["cosine_mean"], out["cosine_min"], out.get("rel_l2"), out.get("max_abs"),
               out.get("top1_agreement"), out.get("top5_agreement")]
        if gate is not None:
            row.append("pass" if out.get("passed") else "FAIL")
        rows.append(row)
    page.add(_table(["output", "shape", "samples", "mean cos", "min cos", "rel L2", "max abs",
                     "top-1 agr", "top-5 agr"] + ([f"mean cos >= {gate}"] if gate is not None
                                                  else []), rows))
    per_sample = {n: o["per_sample_cosine"] for n, o in outputs.items()
                  if o.get("per_sample_cosine")}
    if per_sample:
        page.picture("per-sample cosine histograms",
                     lambda: report_plots.cosine_histograms(per_sample, gate))
    retrieval = fidelity.get("retrieval")
    if retrieval:
        _retrieval(page, retrieval)
    task = fidelity.get("task")
    if task:
        _task(page, task)


def _retrieval(page: _Page, retrieval: dict[str, Any]) -> None:
    a, b = retrieval["a"], retrieval["b"]
    page.add(f"<h2>Retrieval ({_esc(a)} / {_esc(b)}, {_esc(retrieval.get('samples'))} "
             "samples)</h2>")
    rows = [[f"{a} -> {b} argmax agreement", retrieval.get("a_to_b_agreement"), None, None],
            [f"{b} -> {a} argmax agreement", retrieval.get("b_to_a_agreement"), None, None],
            ["mean abs(S_ref - S_cand)", retrieval.get("mean_abs_sim_diff"), None, None],
            ["max abs(S_ref - S_cand)", retrieval.get("max_abs_sim_diff"), None, None]]
    for direction, label in (("a_to_b", f"{a} -> {b}"), ("b_to_a", f"{b} -> {a}")):
        r = (retrieval.get("recall@1") or {}).get(direction)
        if r:
            rows.append([f"recall@1 {label}", None, r["reference"], r["candidate"]])
    page.add(_table(["", "value", "reference", "candidate"], rows))
    sim = retrieval.get("similarity")
    if sim and sim.get("reference") and sim.get("candidate"):
        page.add(f"<p>Similarity matrices on the first {_esc(sim.get('samples'))} pairs "
                 "(row i and column i are a true pair).</p>")
        page.picture("similarity matrices", lambda: report_plots.similarity(
            sim["reference"], sim["candidate"], a, b))


def _task(page: _Page, task: dict[str, Any]) -> None:
    page.add(f"<h2>Task metric ({_esc(task.get('name'))})</h2>")
    rows = [[k, v, (task.get("candidate") or {}).get(k), (task.get("delta") or {}).get(k)]
            for k, v in (task.get("reference") or {}).items()]
    page.add(_table(["metric", "reference", "candidate", "delta"], rows))
    changed = task.get("changed")
    if not changed:
        return
    page.add(f"<h3>Lines whose text changed: {_esc(changed.get('count'))} of "
             f"{_esc(changed.get('total'))}</h3>")
    rows = []
    for line in changed.get("lines") or []:
        image = _img(line["image"], f"line {line.get('index')}", "line") \
            if line.get("image") else ""
        label = line.get("label")
        ref_ok, cand_ok = line.get("reference") == label, line.get("candidate") == label
        rows.append([line.get("index"), image, _esc(label),
                     _esc(line.get("reference")) if ref_ok else
                     f'<span class="bad">{_esc(line.get("reference"))}</span>',
                     _esc(line.get("candidate")) if cand_ok else
                     f'<span class="bad">{_esc(line.get("candidate"))}</span>'])
    page.add(_table(["#", "input", "label", "reference reads", "candidate reads"], rows,
                    (1, 2, 3, 4)))
    if len(changed.get("lines") or []) < (changed.get("count") or 0):
        page.add(f"<p>(first {len(changed['lines'])} shown; lines the reference read right "
                 "first)</p>")


# --- the page ---------------------------------------------------------------------------------

def _search(page: _Page, search: dict[str, Any]) -> None:
    """``onnxcomp search``: the constraints, the chosen model, the Pareto plot and front, the
    fixed recipes measured in the same run, and every trial (``search.output`` builds it)."""
    objectives = list(search.get("objectives") or [])
    columns = list(search.get("columns") or objectives)
    page.add("<h2>Search</h2>")
    page.add('<div class="cards">' + "".join([
        _card(str(search.get("n_trials", "")), "trials finished"),
        _card(str(search.get("n_feasible", "")), "meet every constraint"),
        _card(str(len(search.get("front") or [])), "on the Pareto front")]) + "</div>")
    page.add(f"<p>Objectives (ratios to the float model, lower is better): "
             f"{_esc(', '.join(objectives))}.</p>")
    constraints = search.get("constraints") or []
    if constraints:
        page.add("<h3>Constraints</h3>" + _table(
            ["constraint", "bound", "float model"],
            [[c.get("text"), c.get("bound"), c.get("reference")] for c in constraints]))
    best = search.get("best")
    page.add("<h3>Chosen model</h3>")
    if best:
        page.add(f"<p>Trial {_esc(best.get('trial'))}: <code>{_esc(best.get('recipe'))}</code>"
                 f"{' (' + _esc(best.get('path')) + ')' if best.get('path') else ''}: "
                 "feasible, lowest first objective.</p>")
        page.add(_table(columns, [[(best.get("metrics") or {}).get(c) for c in columns]]))
    else:
        page.add('<div class="verdict fail">No trial met every constraint</div>')
    uri = search.get("plot")
    if uri:
        page.add(_img(uri, "Pareto plot"))
    else:
        page.missing.append("Pareto plot")
        page.add(f'<p class="missing">Picture "Pareto plot" needs matplotlib: '
                 f"<code>{_esc(EXTRA_HINT)}</code></p>")
    headers = ["trial", "recipe", *columns]

    chosen = best.get("trial") if best else None
    front = [[f"{e.get('trial')}{' *' if e.get('trial') == chosen else ''}", e.get("recipe"),
              *((e.get("metrics") or {}).get(c) for c in columns)]
             for e in search.get("front") or []]
    page.add("<h3>Pareto front</h3><p>* the chosen model</p>" + _table(headers, front))
    fixed = search.get("fixed") or []
    if fixed:
        page.add("<h3>Fixed recipes, measured in the same run</h3>" + _table(
            ["trial", "recipe", "meets constraints", *columns],
            [[e.get("trial"), e.get("recipe"), e.get("feasible"),
              *((e.get("metrics") or {}).get(c) for c in columns)] for e in fixed]))
    trials = search.get("trials") or []
    if trials:
        page.add("<h3>Every trial</h3>" + _table(
            ["trial", "recipe", "state", "meets constraints", *columns],
            [[e.get("trial"), e.get("recipe"), e.get("state"), e.get("feasible"),
              *((e.get("metrics") or {}).get(c) for c in columns)] for e in trials]))


def html_page(report: Any, plots: bool | None = None, title: str | None = None) -> str:
    """The page as a string. ``plots``: draw pictures (default: when matplotlib imports)."""
    data = report.to_dict() if hasattr(report, "to_dict") else report
    if not isinstance(data, dict):
        raise TypeError(f"expected a Report or its dict, got {type(data).__name__}")
    page = _Page(report_plots.available() if plots is None else plots)
    command = data.get("command", "report")
    env = data.get("environment") or {}
    heading = title or f"onnxcomp {command}"
    page.add(f"<h1>{_esc(heading)}</h1>")
    page.add('<div class="env">' + " · ".join(f"{_esc(k)} {_esc(v)}" for k, v in env.items())
             + "</div>")
    missing_at = len(page.parts)
    if data.get("search"):
        _search(page, data["search"])
    if not data.get("search") or any(data.get(k) for k in ("verdicts", "fidelity", "bench")):
        _summary(page, data)
    passes = data.get("passes") or []
    if passes:
        _passes(page, passes)
        _layer_harm(page, passes)
    _breakdown(page, data.get("models") or {})
    if data.get("bench"):
        _latency(page, data["bench"])
    if data.get("fidelity"):
        _fidelity(page, data["fidelity"])
    notes = data.get("notes") or []
    if notes:
        page.add("<h2>Notes</h2><ul>" + "".join(f"<li>{_esc(n)}</li>" for n in notes) + "</ul>")
    if page.missing:
        page.parts.insert(missing_at, '<p class="missing">matplotlib is not installed, so '
                          f"{len(page.missing)} pictures are left out ("
                          + _esc(", ".join(page.missing)) + f"): <code>{_esc(EXTRA_HINT)}"
                          "</code>; the tables are complete.</p>")
    body = "\n".join(page.parts)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width\"><title>{_esc(heading)}"
            f"</title><style>{CSS}</style></head><body>\n{body}\n</body></html>\n")


def render_html(report: Any, path: str | os.PathLike, plots: bool | None = None,
                title: str | None = None) -> Path:
    """Write the page for ``report`` (a Report or its dict) to ``path`` atomically."""
    text = html_page(report, plots=plots, title=title)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".onnxcomp-", suffix=".html", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a report is for sharing
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
