"""The report's pictures, drawn with matplotlib (the ``[report]`` extra, imported only here and
only when a picture is drawn). Each function takes plain report data and returns a PNG as a
``data:`` URI, so the page that embeds it needs nothing from the network.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np

# Layers shown in the per-layer chart (the worst ones); the page's table lists them all.
MAX_LAYERS = 40
QUANTIZED, KEPT, REFERENCE, CANDIDATE = "#4c72b0", "#dd8452", "#8c8c8c", "#4c72b0"
DTYPE_COLORS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3",
                "#8c8c8c", "#ccb974", "#64b5cd"]


def available() -> bool:
    try:
        _pyplot()
    except ImportError:
        return False
    return True


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _uri(figure) -> str:
    plt = _pyplot()
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def layer_harm(sqnr: list[dict[str, Any]], kept_float: set[str],
               cosine_alone: dict[str, float] | None = None) -> str:
    """Per-layer SQNR (dB, worst first) as horizontal bars, float-kept layers in another colour;
    beside it, when measured, each layer's harm alone: ``1 - output cosine`` (log scale)."""
    plt = _pyplot()
    rows = sorted(sqnr, key=lambda r: float("inf") if r["sqnr_db"] is None else r["sqnr_db"])
    rows = rows[:MAX_LAYERS]
    names = [r["node"] for r in rows]
    values = [r["sqnr_db"] if r["sqnr_db"] is not None else 0.0 for r in rows]
    colors = [KEPT if n in kept_float else QUANTIZED for n in names]
    panels = 2 if cosine_alone else 1
    height = max(2.5, 0.22 * len(rows) + 1.2)
    figure, axes = plt.subplots(1, panels, figsize=(9 if panels == 2 else 7, height),
                                sharey=True, squeeze=False)
    y = np.arange(len(rows))
    ax = axes[0][0]
    ax.barh(y, values, color=colors)
    ax.set_yticks(y, [_short(n) for n in names], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("SQNR (dB), higher is better")
    ax.grid(axis="x", alpha=0.3)
    if kept_float:
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color=QUANTIZED, label="quantized"),
                           Patch(color=KEPT, label="kept float")], fontsize=7, loc="lower right")
    if cosine_alone:
        ax2 = axes[0][1]
        harm = [max(1e-7, 1.0 - cosine_alone[n]) if n in cosine_alone else np.nan for n in names]
        ax2.barh(y, harm, color=colors)
        ax2.set_xscale("log")
        ax2.set_xlabel("1 - output cosine, this layer alone")
        ax2.grid(axis="x", alpha=0.3)
    return _uri(figure)


def _short(name: str, width: int = 38) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1):]


def breakdown(before: list[dict[str, Any]], after: list[dict[str, Any]] | None) -> str:
    """Bytes by op type, before and after, each bar stacked by dtype."""
    plt = _pyplot()
    sides = [("before", before)] + ([("after", after)] if after else [])
    totals: dict[str, float] = {}
    for _, rows in sides:
        for r in rows:
            totals[r["op"]] = max(totals.get(r["op"], 0.0), 0.0) + r["bytes"]
    # the ops that hold the bytes; the long tail (shape tensors, biases of odd ops) is in the table
    ops = [op for op in sorted(totals, key=lambda op: -totals[op])
           if totals[op] >= 0.01 * max(totals.values())][:8]
    dtypes = sorted({r["dtype"] for _, rows in sides for r in rows})
    color = {d: DTYPE_COLORS[i % len(DTYPE_COLORS)] for i, d in enumerate(dtypes)}
    figure, ax = plt.subplots(figsize=(7, max(2.2, 0.3 * len(ops) * len(sides) + 1.2)))
    width = 0.8 / len(sides)
    labelled = set()
    for s, (side, rows) in enumerate(sides):
        left = np.zeros(len(ops))
        for dtype in dtypes:
            mb = np.array([sum(r["bytes"] for r in rows if r["op"] == op and r["dtype"] == dtype)
                           for op in ops]) / 1e6
            if not mb.any():
                continue
            ax.barh(np.arange(len(ops)) + s * width, mb, width, left=left, color=color[dtype],
                    label=None if dtype in labelled else dtype,
                    hatch="//" if side == "before" and len(sides) == 2 else None,
                    edgecolor="white")
            labelled.add(dtype)
            left += mb
    ax.set_yticks(np.arange(len(ops)) + width * (len(sides) - 1) / 2, ops, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("MB" + (" (hatched: before, plain: after)" if len(sides) == 2 else ""))
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    return _uri(figure)


def latency(results: list[dict[str, Any]]) -> str:
    """One panel per provider x threads: each model's timed runs (a box when the raw times are
    in the report, else its min / p50 / p90 / p99)."""
    plt = _pyplot()
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["provider"], r["threads"]), []).append(r)
    figure, axes = plt.subplots(1, len(groups), figsize=(min(12, 4.2 * len(groups)), 3.2),
                                squeeze=False)
    for ax, ((provider, threads), rows) in zip(axes[0], groups.items()):
        labels = [_short(r["model"], 24) for r in rows]
        positions = np.arange(1, len(rows) + 1)
        if all(r.get("times_ms") for r in rows):
            ax.boxplot([r["times_ms"] for r in rows], positions=positions, widths=0.5,
                       showfliers=True, flierprops={"markersize": 2})
        else:
            for x, r in zip(positions, rows):
                ax.plot([x, x], [r["min_ms"], r["p99_ms"]], color=REFERENCE, lw=1)
                ax.plot([x], [r["p50_ms"]], "o", color=CANDIDATE)
                ax.plot([x], [r["p90_ms"]], "_", color="black", markersize=12)
        ax.set_xticks(positions, labels, fontsize=7, rotation=15)
        ax.set_xlim(0.4, len(rows) + 0.6)
        ax.set_ylabel("ms per run")
        ax.set_ylim(bottom=0)
        ax.set_title(f"{provider.replace('ExecutionProvider', '')}, {threads} thread(s)",
                     fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    return _uri(figure)


def cosine_histograms(outputs: dict[str, list[float]], gate: float | None) -> str:
    """Per output: a histogram of the per-sample cosine, the gate as a line."""
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(outputs), figsize=(min(12, 4 * len(outputs)), 2.8),
                                squeeze=False)
    for ax, (name, values) in zip(axes[0], outputs.items()):
        ax.hist(values, bins=30, color=QUANTIZED)
        if gate is not None:
            ax.axvline(gate, color="#c44e52", ls="--", lw=1, label=f"gate {gate}")
            ax.legend(fontsize=7)
        ax.set_title(_short(name, 30), fontsize=9)
        ax.xaxis.set_major_locator(plt.MaxNLocator(4))
        ax.set_xlabel("cosine per sample")
        ax.set_ylabel("samples")
    return _uri(figure)


def similarity(reference: list[list[float]], candidate: list[list[float]],
               a: str, b: str) -> str:
    """Reference and candidate similarity matrices side by side, and their difference."""
    plt = _pyplot()
    ref, cand = np.asarray(reference), np.asarray(candidate)
    figure, axes = plt.subplots(1, 3, figsize=(11, 3.6))
    low, high = float(min(ref.min(), cand.min())), float(max(ref.max(), cand.max()))
    for ax, matrix, title in ((axes[0], ref, "reference"), (axes[1], cand, "candidate")):
        image = ax.imshow(matrix, vmin=low, vmax=high, cmap="viridis")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(b, fontsize=8)
        ax.set_ylabel(a, fontsize=8)
    figure.colorbar(image, ax=axes[1], fraction=0.046)
    diff = np.abs(ref - cand)
    image = axes[2].imshow(diff, cmap="magma")
    axes[2].set_title("|reference - candidate|", fontsize=9)
    figure.colorbar(image, ax=axes[2], fraction=0.046)
    return _uri(figure)
