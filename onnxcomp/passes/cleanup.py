"""cleanup: lift Constant-node weights to initializers, drop Identity nodes, fold constant
subgraphs, remove dead nodes, sort topologically.

Runs first in every pipeline (so later passes see every weight as an initializer, whatever the
exporter did) and last (so every pass leaves a tidy graph). Constant folding evaluates only nodes
whose inputs are all constants, through ONNX Runtime, and refuses to materialize tensors larger
than ``fold_size_limit`` bytes (folding an Expand of a constant can otherwise blow up the file).
Nothing in If/Loop bodies is folded; those are only tidied.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import onnx_graphsurgeon as gs

from onnxcomp.graph import export_model, import_graph, lift_constant_nodes, tidy
from onnxcomp.model import Model
from onnxcomp.pipeline import Context, PassRecord

NAME = "cleanup"
# Reads weights through gs constants only: works on models whose weights stay on disk.
LAZY_WEIGHTS = True
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Config:
    lift_constants: bool = True
    remove_identity: bool = True
    fold_constants: bool = True
    fold_size_limit: int = 16 * 1024 * 1024

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
        removed.append(node.name)
    return removed


def _signature(graph: gs.Graph) -> tuple:
    constants = tuple(sorted((name, tuple(t.shape or ())) for name, t in graph.tensors().items()
                             if isinstance(t, gs.Constant)))
    nodes = tuple((n.op, tuple(t.name for t in n.inputs), tuple(t.name for t in n.outputs))
                  for n in graph.nodes)
    return nodes, constants


def run(model: Model, config: Config, ctx: Context) -> tuple[Model, PassRecord]:
    graph = import_graph(model)
    record = PassRecord(NAME, params_before=model.parameter_count(),
                        bytes_before=model.weight_bytes())
    before = _signature(graph)
    nodes_before = len(graph.nodes)

    if config.lift_constants:
        lifted = lift_constant_nodes(graph)
        if lifted:
            record.notes.append(f"lifted {lifted} Constant nodes to initializers")
    if config.remove_identity:
        removed = _remove_identities(graph)
        record.touched.extend(removed)
    tidy(graph)
    if config.fold_constants:
        count = len(graph.nodes)
        try:
            graph.fold_constants(size_threshold=config.fold_size_limit, recurse_subgraphs=False,
                                 error_ok=True)
        except Exception as exc:  # folding is an optimization: never fatal
            record.notes.append(f"constant folding skipped: {exc}")
        tidy(graph)
        folded = count - len(graph.nodes)
        if folded > 0:
            record.notes.append(f"folded {folded} constant nodes")
    tidy(graph)

    record.modified = _signature(graph) != before
    if not record.modified:
        record.params_after, record.bytes_after = record.params_before, record.bytes_before
        return model, record
    result = export_model(graph, like=model)
    record.params_after = result.parameter_count()
    record.bytes_after = result.weight_bytes()
    removed_nodes = nodes_before - len(graph.nodes)
    if removed_nodes:
        record.notes.append(f"{removed_nodes} nodes fewer")
    return result, record
