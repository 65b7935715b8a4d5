"""cleanup: name every node, lift Constant-node weights to initializers, drop Identity nodes,
fold constant subgraphs, remove dead nodes, sort topologically.

Runs first in every pipeline (so later passes see every weight as an initializer, whatever the
exporter did) and last (so every pass leaves a tidy graph). Constant folding evaluates only nodes
whose inputs are all constants, through ONNX Runtime, and refuses to materialize tensors larger
than ``fold_size_limit`` bytes (folding an Expand of a constant can otherwise blow up the file).
Nothing in If/Loop bodies is folded but a Transpose of a constant weight nothing else reads (so
that a body's MatMul sees its weight); bodies are otherwise only tidied.

A Loop-carried value the body passes through unchanged (Paddle2ONNX carries a decoder's weights
into its Loop so, and the body's MatMuls then read "activations") becomes an outer-scope read:
the body reads the initial value directly and the carried slot goes, unless its final value is
a graph output (then a dead pass-through keeps it); readers of the final value read the initial
one, which it always equals (``subgraphs.inline_loop_invariants``; float-exact).

Unnamed and duplicate-named nodes (legal ONNX, common in hand-built and some exported graphs) get
a stable unique name, ``<op>_<first output>`` (``graph.name_nodes``), listed in the plan: every
pass addresses nodes by name, and would otherwise skip them. A weight lifted inside nested If
branches is written once, in the innermost graph enclosing its readers
(``graph.share_scoped_initializers``, run on every export), so lifting never grows the file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcomp.graph import (
    export_model,
    import_graph,
    lift_constant_nodes,
    name_nodes,
    node_subgraphs,
    tidy,
    unique_name,
)
from onnxcomp.model import Model
from onnxcomp.pipeline import SKIP, Applied, Capabilities, Context, PassSpec, Plan, PlanRow, option
from onnxcomp.reshapes import static_targets
from onnxcomp.subgraphs import fold_body_transposes, inline_loop_invariants


def _would_store_weight_again(node: gs.Node) -> bool:
    """A node that would store a weight again, wider or twice, if folded: a Cast of a narrow
    stored weight to float (bf16/fp16 storage read as float32), or a Transpose of an int8
    constant (quantize stores a tied table once and reads it transposed). Folding either would
    undo the compression, like folding QuantizeLinear/DequantizeLinear (which onnx-graphsurgeon
    never does)."""
    if not node.inputs or not isinstance(node.inputs[0], gs.Constant):
        return False
    if node.op == "Transpose":
        return node.inputs[0].dtype in (np.int8, np.uint8)
    if node.op != "Cast":
        return False
    if int(node.attrs.get("to", 0)) not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE):
        return False
    return node.inputs[0].dtype not in (np.float32, np.float64)


NAME = "cleanup"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Config:
    name_nodes: bool = option(True, "give unnamed or duplicate-named nodes unique names "
                                    "(<op>_<output>), so that passes can address them")
    lift_constants: bool = option(True, "turn Constant-node weights into initializers")
    remove_identity: bool = option(True, "bypass Identity nodes (not those producing outputs)")
    loop_invariants: bool = option(True, "Loop-carried values the body passes through "
                                         "unchanged are read from the outer scope instead")
    fold_constants: bool = option(True, "evaluate nodes whose inputs are all constants")
    fold_size_limit: int = option(16 * 1024 * 1024,
                                  "largest folded tensor in bytes (an Expand can blow up)")
    static_reshapes: bool = option(True, "Reshape targets computed from the input's own dims "
                                         "(Shape -> Gather -> Unsqueeze -> Concat) become "
                                         "constants with 0 = copy (onnxcomp.reshapes)")

    def __post_init__(self) -> None:
        if self.fold_size_limit < 0:
            raise ValueError(f"fold_size_limit must be >= 0, got {self.fold_size_limit}")

    @classmethod
    def from_short(cls, arg: str | None) -> Config:
        if arg not in (None, ""):
            raise ValueError(f"cleanup takes no argument, got {arg!r}")
        return cls()


def _remove_identities(graph: gs.Graph) -> list[str]:
    """Bypass Identity nodes whose output is not a graph output."""
    outputs = {t.name for t in graph.outputs}
    removed = []
    for node in list(graph.nodes):
        if node.op != "Identity" or len(node.inputs) != 1 or len(node.outputs) != 1:
            continue
        source, result = node.inputs[0], node.outputs[0]
        if result.name in outputs:
            continue
        for consumer in list(result.outputs):
            for i, tensor in enumerate(consumer.inputs):
                if tensor is result:
                    consumer.inputs[i] = source
        node.outputs.clear()
        removed.append(node.name or result.name)
    return removed


def _constant_targets(graph: gs.Graph, targets: dict[str, list[int]]) -> list[str]:
    """Each Reshape whose output is in ``targets`` reads that constant target instead."""
    changed = []
    for node in graph.nodes:
        if node.op != "Reshape" or node.outputs[0].name not in targets:
            continue
        name = unique_name(graph, f"{node.outputs[0].name}__static_shape")
        node.inputs[1] = gs.Constant(name, np.array(targets[node.outputs[0].name], np.int64))
        changed.append(node.name or node.outputs[0].name)
    return changed


def _signature(graph: gs.Graph) -> tuple:
    """What cleanup can change, subgraphs included: nodes (names too) and constants."""
    constants = tuple(sorted((name, tuple(t.shape or ())) for name, t in graph.tensors().items()
                             if isinstance(t, gs.Constant)))
    nodes = tuple((n.op, n.name, tuple(t.name for t in n.inputs),
                   tuple(t.name for t in n.outputs),
                   tuple(_signature(body) for body in node_subgraphs(n)))
                  for n in graph.nodes)
    return nodes, constants


def _invariant_reason(value: str, removed: bool) -> str:
    return (f"{value}: carried unchanged; slot removed" if removed else
            f"{value}: carried unchanged; slot kept (its final value is a graph output)")


def plan(model: Model, config: Config, ctx: Context) -> Plan:
    """What cleanup would do: counted on a scratch copy of the graph (cheap, no weights read)."""
    graph = import_graph(model)
    # the constant Reshape targets are the plan's payload: apply writes them, not finds again
    result = Plan(NAME, config,
                  payload=static_targets(model.proto) if config.static_reshapes else {})
    if config.name_nodes:
        for old, new in name_nodes(graph):
            result.rows.append(PlanRow(new, "name node", f"was {old!r}" if old else "unnamed"))
    if config.lift_constants:
        for node in graph.nodes:
            if node.op == "Constant":
                result.rows.append(PlanRow(node.name or node.outputs[0].name,
                                           "lift to initializer"))
    if config.remove_identity:
        for name in _remove_identities(graph):
            result.rows.append(PlanRow(name, "remove Identity"))
    if config.loop_invariants:
        for loop, value, removed in inline_loop_invariants(graph):
            result.rows.append(PlanRow(loop, "read loop-invariant from outer scope",
                                       _invariant_reason(value, removed)))
    if config.static_reshapes:
        for output, target in result.payload.items():
            result.rows.append(PlanRow(output, "constant Reshape target",
                                       f"{target} (0: the input's dim)"))
    if config.fold_constants:
        result.notes.append("constant subgraphs are folded (up to "
                            f"{config.fold_size_limit} bytes a tensor); dead nodes removed")
    else:
        result.rows.append(PlanRow("constant folding", SKIP, "fold_constants = false"))
    return result


def apply(model: Model, plan_: Plan, ctx: Context) -> Applied:
    config: Config = plan_.config
    targets: dict[str, list[int]] = plan_.payload or {}
    graph = import_graph(model)
    applied = Applied(model, modified=False)
    before = _signature(graph)
    nodes_before = len(graph.nodes)
    if targets:
        applied.touched.extend(_constant_targets(graph, targets))
        applied.notes.append(f"{len(targets)} Reshape targets computed from the input's own "
                             "dims made constant (0: copy the dim); their Shape / Gather / "
                             "Unsqueeze / Concat nodes removed")

    if config.name_nodes:
        renamed = name_nodes(graph)
        if renamed:
            applied.touched.extend(new for _, new in renamed)
            unnamed = sum(1 for old, _ in renamed if not old)
            applied.notes.append(f"named {len(renamed)} nodes ({unnamed} unnamed, "
                                 f"{len(renamed) - unnamed} duplicate names): "
                                 + ", ".join(f"{old or '<unnamed>'} -> {new}"
                                             for old, new in renamed[:5])
                                 + (" ..." if len(renamed) > 5 else ""))
    if config.lift_constants:
        lifted = lift_constant_nodes(graph)
        if lifted:
            applied.notes.append(f"lifted {lifted} Constant nodes to initializers")
    if config.remove_identity:
        applied.touched.extend(_remove_identities(graph))
    if config.loop_invariants:
        inlined = inline_loop_invariants(graph)
        if inlined:
            applied.touched.extend(dict.fromkeys(loop for loop, _, _ in inlined))
            applied.details["loop_invariants"] = [
                {"loop": loop, "value": value, "slot_removed": removed}
                for loop, value, removed in inlined]
            applied.notes.append(
                f"{len(inlined)} Loop-carried values passed through unchanged are read from "
                f"the outer scope ({sum(r for _, _, r in inlined)} slots removed): "
                + ", ".join(value for _, value, _ in inlined[:5])
                + (" ..." if len(inlined) > 5 else ""))
    tidy(graph)
    if config.fold_constants:
        count = len(graph.nodes)
        try:
            graph.fold_constants(size_threshold=config.fold_size_limit, recurse_subgraphs=False,
                                 error_ok=True, should_exclude_node=_would_store_weight_again)
        except Exception as exc:  # noqa: BLE001 - folding is an optimization: never fatal
            applied.notes.append(f"constant folding skipped: {exc}")
        tidy(graph)
        folded = count - len(graph.nodes)
        if folded > 0:
            applied.notes.append(f"folded {folded} constant nodes")
        in_bodies = fold_body_transposes(graph)
        if in_bodies:
            applied.notes.append(f"folded {len(in_bodies)} Transpose nodes of constant weights "
                                 "inside If/Loop/Scan bodies")
    tidy(graph)

    applied.modified = _signature(graph) != before
    if not applied.modified:
        return applied
    applied.model = export_model(graph, like=model)
    removed_nodes = nodes_before - len(graph.nodes)
    if removed_nodes:
        applied.notes.append(f"{removed_nodes} nodes fewer")
    return applied


# Reads weights through gs constants only: works on models whose weights stay on disk.
PASS = PassSpec(NAME, Config, plan, apply, Capabilities(lazy_weights=True),
                summary="lift Constant-node weights, drop Identity, fold constants, remove "
                        "dead nodes (first and last in every pipeline)")
