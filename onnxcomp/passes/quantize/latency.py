"""What each quantized layer saves in time, measured: ONNX Runtime's profiler on this model.

Mixed precision keeps layers float to meet ``min_cosine``; with ``keep_float_by = "latency"`` the
cost of keeping a layer float is the time its int8 form saves on this model, not its bytes or
its rank. Both the prepared float model and the quantized one are profiled on the CPU provider
(graph optimizations on, so what is timed is what runs: QLinearConv, fused activations, the Q/DQ
nodes left over), one calibration batch, ``PROFILE_RUNS`` runs after warm-up (the median per
node), and each site is given:

- its float time: the profiled node carrying its name, or named after its output with
  ``_nchwc`` (ONNX Runtime's NCHWc layout transform renames float Convs so), or after its fused
  activation's output (a Conv -> Relu pair runs as one FusedConv);
- its int8 time: the node carrying its name or ``<name>_token_N`` (the fused QLinearConv /
  QLinearMatMul / MatMulIntegerToFloat), plus the QuantizeLinear of each activation input it
  quantizes (``<tensor>_Q``, shared equally by the sites that read that tensor) and the
  DequantizeLinear nodes of its output QDQ (``<tensor>_DQ``, ``/duplicated`` included).

``saved = float - int8`` in milliseconds per run; negative means the layer is slower in int8
(a small Conv whose Q/DQ costs more than its integer kernel saves). A site the profiles do not
name (another runtime's naming, a fused pattern renamed) gets ``None`` and keeps the harm-only
order. The names are ONNX Runtime 1.3x's; the tests pin the behaviour on a graph built so that
one layer is clearly cheap and another clearly expensive.
"""

from __future__ import annotations

import collections
import json
import re
import tempfile
from pathlib import Path

import numpy as np

from onnxcomp import runtime
from onnxcomp.model import Model
from onnxcomp.passes.quantize.match import Site

PROFILE_RUNS = 20
WARMUP_RUNS = 3


def profile_ms(model: Model, feeds: dict[str, np.ndarray], threads: int = 1,
               runs: int = PROFILE_RUNS) -> dict[str, float]:
    """Milliseconds per run of every profiled node of ``model`` (its optimized graph)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="onnxcomp-profile-") as tmp:
        options = runtime.session_options(threads=threads, optimize=True)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        # In memory (the caller skips models whose weights stay on disk): the profile is of
        # exactly this graph, as ONNX Runtime optimizes it for the CPU.
        session = ort.InferenceSession(model.proto.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        for _ in range(WARMUP_RUNS + runs):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    calls: dict[str, list[float]] = collections.defaultdict(list)
    for event in events:
        name = event.get("name", "")
        if event.get("cat") == "Node" and name.endswith("_kernel_time"):
            calls[name[: -len("_kernel_time")]].append(event["dur"] / 1000.0)
    # The median of the timed calls: one descheduled call on a busy machine moves a mean.
    return {node: float(np.median(durations[WARMUP_RUNS:]))
            for node, durations in calls.items() if len(durations) > WARMUP_RUNS}


def _named(profile: dict[str, float], name: str) -> float | None:
    pattern = re.compile(re.escape(name) + r"(_token_\d+)?$")
    hits = [ms for node, ms in profile.items() if pattern.match(node)]
    return sum(hits) if hits else None


# Activations ONNX Runtime fuses into a float Conv (FusedConv): the fused node is then named after
# the activation's output.
_FUSED_ACTIVATIONS = ("Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "Tanh")


def float_names(model: Model, sites: list[Site]) -> dict[str, list[str]]:
    """Per site, the names its float node may carry in ONNX Runtime's profile: its own, its
    output's with ``_nchwc``, and its fused activation's output's with ``_nchwc``."""
    readers: dict[str, list] = collections.defaultdict(list)
    for node in model.graph.node:
        for name in node.input:
            readers[name].append(node)
    names = {}
    for site in sites:
        found = [site.node, f"{site.output}_nchwc"]
        after = readers.get(site.output, [])
        if len(after) == 1 and after[0].op_type in _FUSED_ACTIVATIONS and after[0].output:
            found.append(f"{after[0].output[0]}_nchwc")
        names[site.node] = found
    return names


def site_savings(float_profile: dict[str, float], int8_profile: dict[str, float],
                 sites: list[Site], inputs_of: dict[str, list[str]],
                 names_of: dict[str, list[str]] | None = None) -> dict[str, float | None]:
    """Milliseconds per run each site saves in int8 (``inputs_of``: site -> the names of the
    activation inputs it quantizes; ``names_of``: :func:`float_names`)."""
    readers: dict[str, int] = collections.Counter(t for names in inputs_of.values() for t in names)
    savings: dict[str, float | None] = {}
    for site in sites:
        before = None
        for candidate in (names_of or {}).get(site.node, [site.node, f"{site.output}_nchwc"]):
            before = _named(float_profile, candidate)
            if before is not None:
                break
        kernel = _named(int8_profile, site.node)
        if before is None or kernel is None:
            savings[site.node] = None
            continue
        boundary = sum(int8_profile.get(f"{t}_Q", 0.0) / readers[t]
                       for t in inputs_of.get(site.node, []))
        if site.output_qdq:
            boundary += sum(ms for node, ms in int8_profile.items()
                            if node.split("/")[0] == f"{site.output_qdq}_DQ")
        savings[site.node] = before - (kernel + boundary)
    return savings


def ranking(harm: list[tuple[str, float]], savings: dict[str, float | None]
            ) -> list[tuple[str, float, float | None]]:
    """(node, cosine alone, ms saved): the order in which layers return to float. Layers
    slower in int8 first (keeping them float costs nothing), then by harm per millisecond
    saved, largest first; layers without a measurement after those, by harm alone."""
    def key(item: tuple[str, float]) -> tuple[int, float]:
        node, cosine = item
        saved = savings.get(node)
        if saved is None:
            return 2, cosine  # unmeasured: harm order (lowest cosine first)
        if saved <= 0:
            return 0, saved  # slower in int8: most slowed first
        return 1, -(1.0 - cosine) / saved
    return [(node, cosine, savings.get(node)) for node, cosine in sorted(harm, key=key)]
