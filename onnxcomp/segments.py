"""Running a model one segment at a time, so calibration holds one layer's worth of state.

Collecting statistics of many intermediate tensors in one ONNX Runtime run of the whole model
costs the whole model's weights in memory plus every statistic at once (for GPTQ on a 1B decoder:
4 GiB of weights and 7.8 GB of ``K x K`` matrices). Instead the graph is cut into consecutive
segments of its node list (which ONNX keeps in topological order):

- A cut at node position ``p`` is crossed by the *live* tensors: produced before ``p`` (graph
  inputs included) and read at or after ``p``. Cuts are placed between the requested tensors,
  at the position with the fewest live tensors in the allowed range: in a transformer that is
  between two blocks, where only the residual stream and a few shared tensors (rotary tables,
  the attention mask) cross.
- Each segment becomes a model of its own: its nodes, the initializers they read (weights kept
  on disk stay there), its live inputs as graph inputs and, as outputs, the live tensors the
  next segments need plus the requested tensors it produces. ``Constant`` nodes are copied into
  every segment that reads them.
- Data flows segment by segment: the boundary tensors of every batch are kept (for a decoder,
  one hidden state per batch), the segment runs over all batches, hands the requested tensors
  to the caller, and is released before the next one is built. Peak memory is one segment's
  weights plus the boundary tensors plus what the caller keeps for the current segment.

The values are those of the whole model (same ONNX Runtime kernels, optimizations off; the tests
compare them). Limits: nodes with subgraphs (If, Loop) are kept whole inside one segment, their
outer-scope reads counted as inputs; the boundary tensors of all batches live in memory.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import onnx

from onnxcomp.model import Model, _tensor_nbytes


@dataclass(frozen=True)
class Segment:
    start: int  # node positions [start, end) in the graph
    end: int
    inputs: tuple[str, ...]  # live tensors entering (graph inputs or earlier segments' outputs)
    outputs: tuple[str, ...]  # live tensors leaving, needed by later segments
    names: tuple[str, ...]  # requested tensors available in this segment


def _subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs read from the enclosing scope (not the ones they define)."""
    reads: set[str] = set()
    for attribute in node.attribute:
        graphs = [attribute.g] if attribute.HasField("g") else []
        for graph in graphs + list(attribute.graphs):
            inner_reads: set[str] = set()
            defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
            for inner in graph.node:
                inner_reads.update(i for i in inner.input if i)
                inner_reads |= _subgraph_reads(inner)
                defined.update(o for o in inner.output if o)
            reads |= inner_reads - defined
    return reads


def node_reads(node: onnx.NodeProto) -> list[str]:
    """Every tensor a node reads, outer-scope reads of its subgraphs included."""
    return list(dict.fromkeys([i for i in node.input if i] + sorted(_subgraph_reads(node))))


class _Liveness:
    """Where each non-constant tensor is produced and last read, by node position."""

    def __init__(self, graph: onnx.GraphProto):
        self.constants = {t.name for t in graph.initializer}
        self.produced: dict[str, int] = {i.name: -1 for i in graph.input
                                         if i.name not in self.constants}
        self.last_read: dict[str, int] = {}
        for position, node in enumerate(graph.node):
            for name in node_reads(node):
                if name not in self.constants:
                    self.last_read[name] = position
            if node.op_type != "Constant":
                for name in node.output:
                    if name:
                        self.produced[name] = position
        self.count = len(graph.node)

    def crossing_counts(self) -> np.ndarray:
        """``counts[p]``: how many tensors cross a cut before node ``p`` (0 < p < count)."""
        delta = np.zeros(self.count + 2, np.int64)
        for name, made in self.produced.items():
            last = self.last_read.get(name, -1)
            if last > made:
                delta[made + 1] += 1
                delta[last + 1] -= 1
        return np.cumsum(delta)[: self.count + 1]

    def live_at(self, position: int) -> list[str]:
        return [name for name, made in self.produced.items()
                if made < position <= self.last_read.get(name, -1)]


# A segment reads at most this many bytes of weights (unless one node alone reads more).
MAX_WEIGHT_BYTES = 256 << 20


def plan(model: Model, names: Sequence[str], per_segment: int,
         max_weight_bytes: int | None = MAX_WEIGHT_BYTES) -> list[Segment]:
    """Consecutive segments, each producing about ``per_segment`` of the requested ``names``
    (more when one node produces several) and reading at most ``max_weight_bytes`` of
    initializers (unless a single node reads more)."""
    if per_segment < 1:
        raise ValueError(f"per_segment must be at least 1, got {per_segment}")
    graph = model.graph
    live = _Liveness(graph)
    missing = [n for n in names if n not in live.produced]
    if missing:
        raise ValueError(f"not a tensor computed by the graph: {missing[0]!r}")
    order = sorted(dict.fromkeys(names), key=lambda n: live.produced[n])
    counts = live.crossing_counts()
    cuts = [0]
    for i in range(per_segment, len(order), per_segment):
        # between the last tensor of this segment and the first of the next, the cheapest cut
        low = max(live.produced[order[i - 1]] + 1, cuts[-1] + 1)
        high = live.produced[order[i]]
        if high >= low:  # else produced by the same node: they cannot be separated
            cuts.append(_cheapest(counts, low, high))
    cuts.append(live.count)
    if max_weight_bytes is not None:
        cuts = _split_heavy(cuts, _first_read_bytes(graph), counts, max_weight_bytes)
    segments = []
    for start, end in pairwise(cuts):
        here = tuple(n for n in order if start <= max(live.produced[n], 0) < end)
        segments.append(Segment(start, end, tuple(live.live_at(start)), tuple(live.live_at(end)),
                                here))
    return segments


def _cheapest(counts: np.ndarray, low: int, high: int) -> int:
    """The position in ``[low, high]`` crossed by the fewest tensors (the latest such)."""
    window = counts[low:high + 1]
    return low + int(np.flatnonzero(window == window.min())[-1])


def _first_read_bytes(graph: onnx.GraphProto) -> np.ndarray:
    """Bytes of the initializers each node is the first to read."""
    sizes = {t.name: _tensor_nbytes(t) for t in graph.initializer}
    result = np.zeros(len(graph.node), np.int64)
    for position, node in enumerate(graph.node):
        for name in node_reads(node):
            result[position] += sizes.pop(name, 0)
    return result


def _split_heavy(cuts: list[int], node_bytes: np.ndarray, counts: np.ndarray, budget: int
                 ) -> list[int]:
    """``cuts`` with more cuts wherever a segment's weights would exceed ``budget``."""
    result = [0]
    for start, end in pairwise(cuts):
        last, running = start, 0
        for position in range(start, end):
            running += int(node_bytes[position])
            if running > budget and position > last:
                cut = _cheapest(counts, last + 1, position)
                result.append(cut)
                running = int(node_bytes[cut:position + 1].sum())
                last = cut
        if end != result[-1]:
            result.append(end)
    return result


def _sub_model(model: Model, nodes: list[onnx.NodeProto], inputs: Sequence[str],
               outputs: Sequence[str], dtypes: dict[str, int], name: str) -> Model:
    graph = model.graph
    reads = {n for node in nodes for n in node_reads(node)}
    sub = onnx.helper.make_graph(
        nodes, name, [onnx.helper.make_tensor_value_info(n, dtypes[n], None) for n in inputs],
        [onnx.ValueInfoProto(name=n) for n in dict.fromkeys(outputs) if n not in inputs],
        [t for t in graph.initializer if t.name in reads])
    proto = onnx.helper.make_model(sub, opset_imports=list(model.proto.opset_import),
                                   ir_version=model.proto.ir_version)
    proto.functions.extend(model.proto.functions)
    return Model(proto, model.source, model.external_data)


def segment_model(model: Model, segment: Segment, dtypes: dict[str, int]) -> Model:
    """The nodes of ``segment`` as a model: live inputs in, live outputs and requests out."""
    graph = model.graph
    nodes = list(graph.node[segment.start:segment.end])
    reads = {name for node in nodes for name in node_reads(node)}
    constant_nodes = [n for n in graph.node[:segment.start]
                      if n.op_type == "Constant" and n.output and n.output[0] in reads]
    return _sub_model(model, constant_nodes + nodes, segment.inputs,
                      segment.outputs + segment.names, dtypes, f"{graph.name}_{segment.start}")


def extract(model: Model, inputs: Sequence[str], outputs: Sequence[str],
            dtypes: dict[str, int]) -> Model:
    """The part of ``model`` that computes ``outputs`` from ``inputs`` (and its initializers):
    how another model with the same boundary tensors (a quantized copy) is cut like a segment.
    Raises ``ValueError`` when ``outputs`` need a tensor that is neither given nor computed."""
    graph = model.graph
    given = set(inputs) | {t.name for t in graph.initializer}
    needed = {n for n in outputs if n not in given}
    chosen = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            chosen.append(node)
            needed.update(n for n in node_reads(node) if n not in given)
    made = {o for node in chosen for o in node.output}
    missing = sorted(needed - made)
    if missing:
        raise ValueError(f"{missing[0]!r} is needed but neither given nor computed")
    return _sub_model(model, chosen[::-1], inputs, outputs, dtypes, f"{graph.name}_part")


def dtypes_of(batch: dict[str, np.ndarray], names: Sequence[str]) -> dict[str, int]:
    return {n: onnx.helper.np_dtype_to_tensor_dtype(np.asarray(batch[n]).dtype) for n in names}


def iterate(model: Model, names: Sequence[str], batches: Iterable[dict[str, np.ndarray]],
            per_segment: int, max_weight_bytes: int | None = MAX_WEIGHT_BYTES
            ) -> Iterator[tuple[Segment, Iterator[dict[str, np.ndarray]]]]:
    """Run ``model`` segment by segment over ``batches``: yields ``(segment, values)`` in order,
    where ``values`` gives, batch by batch, the requested tensors available in that segment.
    Asking for the next segment finishes the current one (its unread batches still run)."""
    from onnxcomp import runtime

    segments = plan(model, names, per_segment, max_weight_bytes)
    carried = [dict(batch) for batch in batches]  # boundary tensors, per batch
    if not carried:
        return
    for segment in segments:
        sub = segment_model(model, segment, dtypes_of(carried[0], segment.inputs))
        wanted = [o.name for o in sub.graph.output]
        # A segment whose requests are all its inputs, with nothing to hand on, need not run.
        sess = runtime.session(sub, optimize=False) if wanted else None
        del sub

        def values(sess=sess, wanted=wanted, segment=segment):
            for i in range(len(carried)):
                batch = carried[i]
                result = (runtime.run(sess, {n: batch[n] for n in segment.inputs}, wanted)
                          if wanted else {})
                result.update({n: batch[n] for n in segment.inputs})
                carried[i] = {name: result[name] for name in segment.outputs}
                requested = {name: result[name] for name in segment.names}
                # Nothing of this batch but what the caller gets is held past the yield (nor is
                # that after it): else the next batch's run would start with two batches alive.
                del result, batch
                yield requested
                del requested

        flow = values()
        yield segment, flow
        for _ in flow:  # whatever the caller left unread still has to reach the next segment
            pass
        del sess, flow, values  # values' defaults hold the session: free it before the next
