"""One report for compress, validate and bench: JSON for machines, Markdown tables for people."""

from __future__ import annotations

import json
import os
import platform
import tempfile
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np

# ``progress(message)``: a one-off line through the process's Progress (onnxcomp.progress: on
# stderr so stdout stays a clean table or JSON; silent with --quiet). The same function object,
# so ``progress.as_progress(report.progress)`` is the process's Progress, bars included.
from onnxcomp.progress import message as progress  # noqa: F401


def environment(provider: str = "cpu") -> dict[str, Any]:
    import onnx
    import onnxruntime

    from onnxcomp import __version__

    return {
        "onnxcomp": __version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "provider": provider,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        **cpu(),
    }


def cpu(cpuinfo: str | None = None) -> dict[str, Any]:
    """The CPU's model and the int8 instructions its kernels use (Linux; else empty): without
    VNNI, x86 CPUs add uint8 x int8 products in saturating 16-bit pairs (``u8s8_overflow``), so
    int8 speed and fidelity figures depend on it."""
    try:
        text = Path("/proc/cpuinfo").read_text() if cpuinfo is None else cpuinfo
    except OSError:
        return {}
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                  if line.startswith("model name")), "")
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines()
                      if line.startswith("flags")), []))
    if not flags:
        return {"cpu": model} if model else {}
    dot = ("avx512-vnni" if "avx512_vnni" in flags else "avx-vnni" if "avx_vnni" in flags
           else "avx2 (no vnni)" if "avx2" in flags else "none of avx2/vnni")
    return {"cpu": model, "int8_dot_product": dot}


def _plain(value: Any) -> Any:
    """Make dataclasses, numpy scalars and paths JSON-friendly."""
    if is_dataclass(value) and not isinstance(value, type):
        return _plain(asdict(value))
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            if value == 0 or 1e-3 <= abs(value) < 1e6:
                return f"{value:.4g}"
            return f"{value:.3e}"
        return "" if value is None else str(value)

    text_rows = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text_rows)) if text_rows else len(h)
              for i, h in enumerate(headers)]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in text_rows]
    return "\n".join(lines)


def write_json_atomic(data: Any, path: str | os.PathLike) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".onnxcomp-", suffix=".json", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(_plain(data), handle, indent=2)
            handle.write("\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a report is for sharing
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


@dataclass
class Report:
    """What a command did and measured. Sections are filled by whoever produced them."""

    command: str
    environment: dict[str, Any] = field(default_factory=environment)
    models: dict[str, Any] = field(default_factory=dict)
    passes: list[Any] = field(default_factory=list)
    fidelity: dict[str, Any] | None = None
    bench: dict[str, Any] | None = None
    # A pipeline of parts: greedy-generation agreement (measure/generation.py), and its
    # generation bench (time to first token, tokens/s).
    generation: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    # Why the result is not worth shipping, when it is not (larger than its input, below the
    # fidelity floor): shown first in tables and pages, and on stderr by the CLI.
    verdicts: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return _plain(asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def write(self, path: str | os.PathLike) -> Path:
        return write_json_atomic(self.to_dict(), path)

    def table(self) -> str:
        parts = [f"VERDICT: {verdict}" for verdict in self.verdicts]
        if self.passes:
            rows = []
            for record in self.passes:
                r = _plain(record)
                rows.append([r["name"], "yes" if r["modified"] else "no", len(r["touched"]),
                             r["params_before"], r["params_after"], r["bytes_before"],
                             r["bytes_after"], f"{r['seconds']:.2f}"])
            parts.append(markdown_table(
                ["pass", "modified", "nodes", "params before", "params after", "bytes before",
                 "bytes after", "seconds"], rows))
            for record in self.passes:
                r = _plain(record)
                for note in r.get("notes", []):
                    parts.append(f"- {r['name']}: {note}")
        if self.fidelity:
            parts.append(fidelity_table(self.fidelity))
        if self.bench:
            parts.append(bench_table(self.bench))
        if self.generation:
            parts.append(generation_table(self.generation))
        parts.extend(f"note: {n}" for n in self.notes)
        return "\n\n".join(p for p in parts if p)


def plot_tradeoff(bench: dict[str, Any], path: str | os.PathLike,
                  fidelity: dict[str, float] | None = None, provider: str | None = None,
                  threads: int | None = None) -> Path:
    """Size against p50 latency, one point per model, labelled with its fidelity if given.

    ``bench``: a report's ``bench`` section; ``fidelity``: model name -> a score (e.g. the mean
    cosine against the reference); ``provider``/``threads``: which timing to plot (default: the
    first measured). Needs the ``[report]`` extra (matplotlib), imported only here.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from onnxcomp.errors import UserError

        raise UserError("plots need matplotlib: pip install 'onnxcomp[report]'") from None
    results = bench.get("results") or []
    if not results:
        from onnxcomp.errors import UserError

        raise UserError("the bench section has no timings to plot")
    provider = provider or results[0]["provider"]
    threads = threads or results[0]["threads"]
    sizes = {m["name"]: m["bytes"] / 1e6 for m in bench.get("models", [])}
    chosen = [r for r in results if r["provider"] == provider and r["threads"] == threads]
    figure, axes = plt.subplots(figsize=(6, 4))
    for row in chosen:
        x, y = sizes[row["model"]], row["p50_ms"]
        axes.scatter([x], [y])
        label = row["model"]
        if fidelity and row["model"] in fidelity:
            label += f" ({fidelity[row['model']]:.4f})"
        axes.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    axes.set_xlabel("size on disk (MB)")
    axes.set_ylabel(f"p50 latency (ms), {provider.replace('ExecutionProvider', '')}, "
                    f"{threads} thread(s)")
    axes.set_title("size / latency" + (" / fidelity" if fidelity else ""))
    # room on the right and on top for the labels
    axes.set_xlim(0, 1.3 * max(sizes[r["model"]] for r in chosen))
    axes.set_ylim(0, 1.15 * max(r["p50_ms"] for r in chosen))
    axes.grid(alpha=0.3)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(target, dpi=120)
    plt.close(figure)
    return target


def fidelity_table(fidelity: dict[str, Any]) -> str:
    """Markdown tables: per output, retrieval agreement (dual encoders), task metric, gate."""
    parts = []
    gate = fidelity.get("min_cosine")
    headers = ["output", "shape", "mean cos", "min cos", "rel L2", "max abs", "top-1 agr",
               "top-5 agr"]
    if gate is not None:
        headers.append(f"mean cos >= {gate}")
    rows = []
    for name, out in fidelity.get("outputs", {}).items():
        row = [name, "x".join(str(d) for d in out.get("shape") or []), out["cosine_mean"],
               out["cosine_min"], out["rel_l2"], out["max_abs"], out.get("top1_agreement"),
               out.get("top5_agreement")]
        if gate is not None:
            row.append("pass" if out.get("passed") else "FAIL")
        rows.append(row)
    parts.append(markdown_table(headers, rows))
    retrieval = fidelity.get("retrieval")
    if retrieval:
        a, b = retrieval["a"], retrieval["b"]
        rows = [
            [f"{a} -> {b} argmax agreement", retrieval["a_to_b_agreement"], None, None],
            [f"{b} -> {a} argmax agreement", retrieval["b_to_a_agreement"], None, None],
            ["mean abs(S_ref - S_cand)", retrieval["mean_abs_sim_diff"], None, None],
            ["max abs(S_ref - S_cand)", retrieval["max_abs_sim_diff"], None, None],
        ]
        recall = retrieval.get("recall@1")
        if recall:
            for direction, label in (("a_to_b", f"{a} -> {b}"), ("b_to_a", f"{b} -> {a}")):
                r = recall[direction]
                rows.append([f"recall@1 {label}", None, r["reference"], r["candidate"]])
        parts.append(markdown_table(
            [f"retrieval ({retrieval['samples']} samples)", "value", "reference", "candidate"],
            rows))
    task = fidelity.get("task")
    if task:
        rows = [[key, value, task["candidate"].get(key), task["delta"].get(key)]
                for key, value in task["reference"].items()]
        parts.append(markdown_table([f"task metric ({task['name']})", "reference", "candidate",
                                     "delta"], rows))
    summary = f"data: {fidelity.get('data')} ({fidelity.get('batches')} batches)"
    if gate is not None:
        verdict = "passed" if fidelity.get("passed") else "FAILED"
        summary += f"; gate mean cosine >= {gate}: {verdict}"
    parts.append(summary)
    return "\n\n".join(parts)


def bench_table(bench: dict[str, Any]) -> str:
    """Markdown table: one row per model x provider x threads, memory and size alongside."""
    models = {m["name"]: m for m in bench.get("models", [])}
    memory = {(m["model"], m["provider"]): m for m in bench.get("memory", [])}
    rows = []
    for r in bench.get("results", []):
        info = models.get(r["model"], {})
        mem = memory.get((r["model"], r["provider"]), {})
        rows.append([
            r["model"], r["provider"].replace("ExecutionProvider", ""), r["threads"],
            r["p50_ms"], r["p90_ms"], r["p99_ms"], r["throughput"], r["latency_ratio"],
            info.get("bytes", 0) / 1e6 if info else None, info.get("size_ratio"),
            info.get("params"), mem.get("session_peak_mb"), mem.get("peak_rss_mb"),
        ])
    table = markdown_table(
        ["model", "provider", "threads", "p50 ms", "p90 ms", "p99 ms", "samples/s",
         "p50 ratio", "size MB", "size ratio", "params", "session peak MB", "process peak MB"],
        rows)
    runs = sorted({r["runs"] for r in bench.get("results", [])})
    span = f"{runs[0]}" if len(runs) == 1 else f"{runs[0]}-{runs[-1]}" if runs else "0"
    return (table + f"\n\nbatch {bench.get('batch')}, {span} timed runs per model (at least "
            f"{bench.get('runs')}, spanning >= {bench.get('min_seconds', 0):g} s) after "
            f"{bench.get('warmup')} warm-up, interleaved; ratios against the first model")


def generation_table(generation: dict[str, Any]) -> str:
    """The greedy-generation comparison and/or the generation bench of a pipeline."""
    out = []
    agreement = generation.get("agreement")
    if agreement:
        rows = [[k, f"{v:.4f}" if isinstance(v, float) else v] for k, v in agreement.items()]
        out.append(markdown_table(["generation (candidate vs reference)", "value"], rows))
    timing = generation.get("timing")
    if timing:
        keys = ["first_token_ms", "per_token_ms_p50", "per_token_ms_p90", "tokens_per_s",
                "peak_rss_mb"]
        rows = [[name] + [_fmt(t.get(k)) for k in keys] for name, t in timing.items()]
        out.append(markdown_table(["pipeline", "time to first token ms", "per token ms p50",
                                   "p90", "tokens/s", "peak RSS MB"], rows))
    return "\n\n".join(out)


def _fmt(value: Any) -> str:
    return "" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)
