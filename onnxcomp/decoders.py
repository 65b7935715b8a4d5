"""Merged decoders: two decoder files as one graph whose If picks the path, and back.

Hugging Face Optimum exports a generative decoder as ``decoder_model.onnx`` (first step, no
cache) and ``decoder_with_past_model.onnx`` (later steps, reads the key/value cache), holding
the same weights under the same names, and can merge them into ``decoder_model_merged.onnx``:
one If on the bool input ``use_cache_branch`` whose then-branch is the with-past path and whose
else-branch is the first-step path, both reading one copy of the weights from the outer graph.

onnxcomp uses the merged form as the unit of compression for a decoder group: a pass sees each
tied weight once (an outer initializer read by both branches), so it is quantized, factored or
pruned once and both paths read the one result; :func:`split_merged` then gives back the two
files, whose weights are byte-identical under the same names.

Merging:
- every initializer goes to the outer graph; one with the same name and the same content in
  both files is stored once; a name whose contents differ is renamed in the with-past branch;
- every other name inside a branch gets a branch prefix (names are unique across a model and
  its subgraphs), except the outer inputs and initializers it reads;
- graph inputs are the union (with-past's first), plus ``use_cache_branch`` (bool [1]);
- outputs are the first-step decoder's; an output the with-past decoder lacks is its past input
  passed through when there is one (Whisper's cross-attention cache ``present.i.encoder.*`` is
  not re-output with past), recorded in metadata so the split drops it again.
Limits: both files must share the opset imports they use; a first-step decoder missing an output
of the with-past one, or an output lacking in both ways, is refused.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.errors import UserError

FLAG = "use_cache_branch"
PADDED_KEY = "onnxcomp.merged.padded_with_past_outputs"
PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."


def _same_tensor(a: TensorProto, b: TensorProto) -> bool:
    if a.data_type != b.data_type or list(a.dims) != list(b.dims):
        return False
    return np.array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b), equal_nan=True)


def _subgraph_names(graph: onnx.GraphProto) -> tuple[set[str], set[str]]:
    """(names read, names defined) in ``graph`` and every nested subgraph."""
    read: set[str] = set()
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    for node in graph.node:
        read.update(n for n in node.input if n)
        defined.update(n for n in node.output if n)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                sub_read, sub_defined = _subgraph_names(sub)
                read |= sub_read
                defined |= sub_defined
    read.update(o.name for o in graph.output)
    return read, defined


def _rename(graph: onnx.GraphProto, mapping: dict[str, str],
            node_name: Callable[[str], str] | None = None) -> None:
    """Rename values (and, with ``node_name``, nodes) in ``graph`` and its subgraphs."""
    for node in graph.node:
        node.input[:] = [mapping.get(n, n) for n in node.input]
        node.output[:] = [mapping.get(n, n) for n in node.output]
        if node_name is not None:
            node.name = node_name(node.name)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                _rename(sub, mapping, node_name)
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        value.name = mapping.get(value.name, value.name)
    for tensor in graph.initializer:
        tensor.name = mapping.get(tensor.name, tensor.name)


def _branch(model: onnx.ModelProto, tag: str, outer: set[str], initializer_names: dict[str, str],
            outputs: list[str], passthrough: dict[str, str]) -> onnx.GraphProto:
    graph = onnx.GraphProto()
    graph.CopyFrom(model.graph)
    del graph.input[:]
    del graph.initializer[:]
    _, defined = _subgraph_names(model.graph)
    keep = {i.name for i in model.graph.input} | set(initializer_names)
    mapping = {name: f"{tag}/{name}" for name in defined - keep if name}
    mapping.update(initializer_names)
    # Node names are prefixed too: passes address nodes by name, and the two paths hold the same.
    _rename(graph, mapping, lambda name: f"{tag}/{name}" if name else name)
    by_name = {o.name: o for o in model.graph.output}
    past_types = {i.name: i for i in model.graph.input}
    del graph.output[:]
    for name in outputs:
        if name in by_name:
            source = mapping.get(name, name)
            if source in outer or source == name:  # a graph input passed out: copy it
                graph.node.append(helper.make_node("Identity", [source], [f"{tag}/out/{name}"],
                                                   name=f"{tag}/out/{name}"))
                source = f"{tag}/out/{name}"
            value = onnx.ValueInfoProto()
            value.CopyFrom(by_name[name])
            value.name = source
            graph.output.append(value)
        else:
            graph.node.append(helper.make_node("Identity", [passthrough[name]],
                                               [f"{tag}/out/{name}"], name=f"{tag}/out/{name}"))
            value = onnx.ValueInfoProto()
            value.CopyFrom(past_types[passthrough[name]])
            value.name = f"{tag}/out/{name}"
            graph.output.append(value)
    del graph.value_info[:]
    graph.name = f"{tag}_branch"
    return graph


def _model_of(graph: onnx.GraphProto, a: onnx.ModelProto, b: onnx.ModelProto
              ) -> onnx.ModelProto:
    """A model around ``graph`` with the higher opset of each domain and IR version of a, b."""
    opsets: dict[str, int] = {}
    for entry in list(a.opset_import) + list(b.opset_import):
        opsets[entry.domain] = max(opsets.get(entry.domain, 0), entry.version)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v)
                                                    for d, v in opsets.items()])
    model.ir_version = max(a.ir_version, b.ir_version)
    return model


def merge_decoders(decoder: onnx.ModelProto, with_past: onnx.ModelProto) -> onnx.ModelProto:
    """One model with an If on ``use_cache_branch``: then = ``with_past``, else = ``decoder``."""
    if FLAG in {i.name for i in list(decoder.graph.input) + list(with_past.graph.input)}:
        raise UserError(f"cannot merge decoders: an input is already named {FLAG!r}")
    first_outputs = [o.name for o in decoder.graph.output]
    past_outputs = {o.name for o in with_past.graph.output}
    extra = sorted(past_outputs - set(first_outputs))
    if extra:
        raise UserError(f"cannot merge decoders: the with-past decoder has outputs the first-step "
                        f"decoder lacks: {', '.join(extra[:4])}")
    past_inputs = {i.name for i in with_past.graph.input}
    passthrough = {}
    for name in first_outputs:
        if name not in past_outputs:
            past = PAST_PREFIX + name[len(PRESENT_PREFIX):] if name.startswith(PRESENT_PREFIX) else ""
            if past not in past_inputs:
                raise UserError(f"cannot merge decoders: the with-past decoder has no output "
                                f"{name!r} and no past input {past!r} to pass through")
            passthrough[name] = past

    initializers: list[TensorProto] = []
    outer_by_name: dict[str, TensorProto] = {}
    renamed_past: dict[str, str] = {}
    for tensor in decoder.graph.initializer:
        outer_by_name[tensor.name] = tensor
        initializers.append(tensor)
    for tensor in with_past.graph.initializer:
        known = outer_by_name.get(tensor.name)
        if known is None:
            outer_by_name[tensor.name] = tensor
            initializers.append(tensor)
        elif not _same_tensor(known, tensor):
            copy = TensorProto()
            copy.CopyFrom(tensor)
            copy.name = f"with_past/{tensor.name}"
            renamed_past[tensor.name] = copy.name
            initializers.append(copy)

    inputs: list[onnx.ValueInfoProto] = list(with_past.graph.input)
    seen = {i.name for i in inputs}
    for value in decoder.graph.input:
        if value.name not in seen:
            inputs.append(value)
            seen.add(value.name)
    outer = seen | {t.name for t in initializers}
    first_init = {t.name: t.name for t in decoder.graph.initializer}
    past_init = {t.name: renamed_past.get(t.name, t.name) for t in with_past.graph.initializer}
    then_branch = _branch(with_past, "with_past", outer, past_init, first_outputs, passthrough)
    else_branch = _branch(decoder, "first", outer, first_init, first_outputs, {})
    flag = helper.make_tensor_value_info(FLAG, TensorProto.BOOL, [1])
    node = helper.make_node("If", [FLAG], first_outputs, name="optimum::if",
                            then_branch=then_branch, else_branch=else_branch)
    outputs = []
    for value in decoder.graph.output:
        copy = onnx.ValueInfoProto()
        copy.CopyFrom(value)
        outputs.append(copy)
    graph = helper.make_graph([node], "merged_decoder", inputs + [flag], outputs, initializers)
    merged = _model_of(graph, decoder, with_past)
    merged.producer_name = "onnxcomp"
    props = {p.key: p.value for p in decoder.metadata_props}  # the exporter's tags carry over
    props[PADDED_KEY] = json.dumps(sorted(passthrough))
    helper.set_model_props(merged, props)
    return merged


def _live_nodes(nodes: list[onnx.NodeProto], wanted: set[str]) -> list[onnx.NodeProto]:
    """The nodes (in order) that ``wanted`` depends on, subgraph reads included."""
    live: list[onnx.NodeProto] = []
    needed = set(wanted)
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            live.append(node)
            needed.update(n for n in node.input if n)
            for attr in node.attribute:
                for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH
                            else list(attr.graphs)):
                    needed |= _subgraph_names(sub)[0]
    return live[::-1]


def _strip_prefix(graph: onnx.GraphProto, tag: str) -> None:
    """Undo the merge's branch prefix on values and node names where no name collides."""
    read, defined = _subgraph_names(graph)
    taken = (read | defined)
    prefix = f"{tag}/"
    mapping = {}
    for name in defined:
        if name.startswith(prefix) and name[len(prefix):] not in taken:
            mapping[name] = name[len(prefix):]
    _rename(graph, mapping, lambda n: n.removeprefix(prefix))


def _slice(graph: onnx.GraphProto, branch: onnx.GraphProto, if_node: onnx.NodeProto,
           drop_outputs: set[str], tag: str) -> onnx.GraphProto:
    """One path of a merged decoder as a standalone graph."""
    body = onnx.GraphProto()
    body.CopyFrom(branch)
    mapping = dict(zip([o.name for o in body.output], if_node.output))
    _, defined = _subgraph_names(body)
    # A branch output that is an outer name (no node makes it) needs an Identity to be renamed.
    for source, target in list(mapping.items()):
        if source not in defined:
            body.node.append(helper.make_node("Identity", [source], [target], name=target))
            del mapping[source]
    _rename(body, mapping)
    kept_outputs = [o for o in graph.output
                    if o.name in if_node.output and o.name not in drop_outputs]
    nodes = [n for n in graph.node if n is not if_node] + list(body.node)
    nodes = _live_nodes(nodes, {o.name for o in kept_outputs})
    out = helper.make_graph(nodes, graph.name, [], [])
    read, _ = _subgraph_names(out)
    out.input.extend(i for i in graph.input if i.name in read and i.name != FLAG)
    # Weights of the outer graph (shared by both paths) and of the branch itself (a pass may
    # have lifted a branch's constants into its own initializers).
    out.initializer.extend(t for t in graph.initializer if t.name in read)
    out.initializer.extend(t for t in body.initializer if t.name in read)
    out.output.extend(kept_outputs)
    _strip_prefix(out, tag)
    return out


def split_merged(merged: onnx.ModelProto) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(first-step decoder, with-past decoder) from a merged decoder; weights keep their names."""
    graph = merged.graph
    ifs = [n for n in graph.node if n.op_type == "If" and list(n.input) == [FLAG]]
    if len(ifs) != 1:
        raise UserError(f"not a merged decoder: expected one If on {FLAG!r}, found {len(ifs)}")
    if_node = ifs[0]
    if any(name in if_node.output for n in graph.node if n is not if_node for name in n.input):
        raise UserError("unsupported merged decoder: nodes read the If's outputs")
    branches = {a.name: a.g for a in if_node.attribute}
    props = {p.key: p.value for p in merged.metadata_props}
    padded = set(json.loads(props.get(PADDED_KEY, "[]")))
    models = []
    for key, drop, tag in (("else_branch", set(), "first"), ("then_branch", padded, "with_past")):
        part = helper.make_model(_slice(graph, branches[key], if_node, drop, tag),
                                 opset_imports=list(merged.opset_import))
        part.ir_version = merged.ir_version
        part.producer_name = merged.producer_name
        part.metadata_props.extend(p for p in merged.metadata_props if p.key != PADDED_KEY)
        models.append(part)
    return models[0], models[1]


# --- side by side: both paths as one plain graph (no If), the unit of compression ----------

FIRST, LATER = "first", "with_past"


def _prefixed(model: onnx.ModelProto, tag: str, initializer_names: dict[str, str]
              ) -> onnx.GraphProto:
    graph = onnx.GraphProto()
    graph.CopyFrom(model.graph)
    del graph.initializer[:]
    read, defined = _subgraph_names(model.graph)
    mapping = {name: f"{tag}/{name}" for name in (read | defined) - set(initializer_names)
               if name}
    mapping.update(initializer_names)
    _rename(graph, mapping, lambda name: f"{tag}/{name}" if name else name)
    # A symbolic dimension is one size across a graph: each path keeps its own ("sequence" is
    # the prompt length in one path and 1 in the other).
    _dim_params(graph, lambda p: f"{tag}/{p}")
    return graph


def _dim_params(graph: onnx.GraphProto, change: Callable[[str], str]) -> None:
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param"):
                dim.dim_param = change(dim.dim_param)


def side_by_side(first: onnx.ModelProto, later: onnx.ModelProto) -> onnx.ModelProto:
    """One graph running both decoder paths side by side: every input, output and node of the
    first-step decoder prefixed ``first/``, of the with-past decoder ``with_past/``; a weight
    both hold (same name, same content) is one initializer read by both. Passes see each shared
    weight once, at the top level (calibration, GPTQ statistics, mixed precision all apply);
    :func:`split_side_by_side` gives the two files back."""
    initializers: list[TensorProto] = []
    first_names: dict[str, str] = {}
    later_names: dict[str, str] = {}
    by_name: dict[str, TensorProto] = {}
    for tensor in first.graph.initializer:
        by_name[tensor.name] = tensor
        initializers.append(tensor)
        first_names[tensor.name] = tensor.name
    for tensor in later.graph.initializer:
        known = by_name.get(tensor.name)
        if known is not None and _same_tensor(known, tensor):
            later_names[tensor.name] = tensor.name
            continue
        copy = TensorProto()
        copy.CopyFrom(tensor)
        if known is not None:
            copy.name = f"{LATER}/{tensor.name}"
        later_names[tensor.name] = copy.name
        initializers.append(copy)
    a = _prefixed(first, FIRST, first_names)
    b = _prefixed(later, LATER, later_names)
    graph = helper.make_graph(list(a.node) + list(b.node), "decoders_side_by_side",
                              list(a.input) + list(b.input), list(a.output) + list(b.output),
                              initializers)
    graph.value_info.extend(list(a.value_info) + list(b.value_info))
    model = _model_of(graph, first, later)
    model.metadata_props.extend(first.metadata_props)
    return model


def split_side_by_side(model: onnx.ModelProto) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(first-step decoder, with-past decoder) from :func:`side_by_side`'s graph (compressed or
    not): each path's outputs, the nodes they need and the weights those read."""
    graph = model.graph
    out = []
    for tag in (FIRST, LATER):
        prefix = f"{tag}/"
        outputs = [o for o in graph.output if o.name.startswith(prefix)]
        if not outputs:
            raise UserError(f"not a side-by-side decoder graph: no outputs named {prefix}*")
        nodes = _live_nodes(list(graph.node), {o.name for o in outputs})
        part = helper.make_graph(nodes, graph.name, [], [])
        read, _ = _subgraph_names(part)
        read |= {o.name for o in outputs}
        part.input.extend(i for i in graph.input if i.name in read)
        part.initializer.extend(t for t in graph.initializer if t.name in read)
        part.output.extend(outputs)
        part.value_info.extend(v for v in graph.value_info if v.name in read)
        _strip_prefix(part, tag)
        # A weight the pass made once for both paths is named after one path's node
        # ("first//layers.0/fc1/MatMul_B_int8"): the same name in both files, so the files
        # (and a merged file built from them) share it by name as well as by content.
        _strip_prefix(part, LATER if tag == FIRST else FIRST)
        _dim_params(part, lambda p, prefix=prefix: p.removeprefix(prefix))
        single = helper.make_model(part, opset_imports=list(model.opset_import))
        single.ir_version = model.ir_version
        single.producer_name = model.producer_name
        single.metadata_props.extend(model.metadata_props)
        out.append(single)
    return out[0], out[1]
