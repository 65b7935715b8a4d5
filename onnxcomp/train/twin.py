"""The differentiable twin of an ONNX graph: a ``torch.nn.Module`` that runs the graph node by
node with PyTorch ops, its weights as trainable parameters, and writes them back afterwards.

- Weights: every float tensor the model stores, whether an initializer or the ``value`` of a
  ``Constant`` node (paddle2onnx stores PP-OCR's weights that way), becomes an ``nn.Parameter``
  in ``self.weights``, keyed by a safe version of its ONNX name (``onnx_name(key)`` gives it
  back). By default every float tensor of two or more elements trains; one-element floats
  (GELU's √2, the attention scale, HardSwish's 6, Pow's exponent, Resize's scales) are formula
  constants and BatchNormalization's running mean and variance are statistics: they stay
  frozen unless named in ``trainable``. Integer tensors (shapes, indices,
  quantized weights) are buffers.
- Forward: nodes in topological order through the op table (``onnxcomp.train.ops``); shapes are
  computed eagerly, so dynamic shapes need no tracing. ``run(feeds, outputs)`` returns any named
  tensors (intermediates for hint losses); ``forward`` returns the graph outputs plus
  ``extra_outputs``.
- Write-back: ``write_back(model)`` copies the model and replaces the values of the tensors whose
  parameters changed, in the same storage field, keeping name, type, shape and position; every
  other byte of the model is untouched, and an untrained twin gives back an identical model.
- Limits: ops outside the table (``unsupported_ops``) are refused by name before anything runs;
  float8, 4-bit, uint16/32/64 and string tensors are refused; a model whose weights are still on
  disk is read tensor by tensor (the whole model must then fit in memory as parameters).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import external_data_helper, numpy_helper

from onnxcomp.checks import model_shell
from onnxcomp.errors import OurBug, UserError
from onnxcomp.model import Model, read_external
from onnxcomp.train import ops
from onnxcomp.train.ops_common import (
    FLOAT_TYPES,
    TORCH_DTYPES,
    WIDENED_ONNX,
    Ctx,
    Unsupported,
    decode_attribute,
    to_numpy,
    to_tensor,
)


def unsupported_ops(model: Model) -> list[str]:
    """Ops of the model the twin can't run, as ``op_type`` (``domain:op_type`` off the default
    domain), sorted; empty when the whole graph is supported."""
    missing = set()
    for node in model.graph.node:
        if ops.lookup(node.domain, node.op_type) is None:
            missing.add(node.op_type if node.domain in ops.DEFAULT_DOMAINS
                        else f"{node.domain}:{node.op_type}")
    return sorted(missing)


def _safe_key(name: str, taken: set[str]) -> str:
    # ParameterDict keys can't contain dots or clash with Module attributes: prefix and clean.
    base = "w_" + re.sub(r"\W", "_", name)
    key, suffix = base, 1
    while key in taken:
        suffix += 1
        key = f"{base}_{suffix}"
    taken.add(key)
    return key


def _tensor_array(tensor: onnx.TensorProto, source: Path | None) -> np.ndarray:
    if external_data_helper.uses_external_data(tensor):
        if source is None:
            raise UserError(f"weight {tensor.name!r} is on disk but the model's folder is unknown")
        return np.array(read_external(tensor, source))
    return numpy_helper.to_array(tensor)


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """The ``value`` tensor of a Constant node that stores a float weight, else None."""
    if node.op_type != "Constant" or node.domain not in ops.DEFAULT_DOMAINS:
        return None
    for attribute in node.attribute:
        if attribute.name == "value" and attribute.t.data_type in FLOAT_TYPES:
            return attribute.t
    return None


def _element_types(graph: onnx.GraphProto) -> dict[str, int]:
    """ONNX element type of every tensor the graph states one for."""
    types = {v.name: v.type.tensor_type.elem_type
             for v in list(graph.input) + list(graph.value_info) + list(graph.output)
             if v.type.HasField("tensor_type")}
    types.update({t.name: t.data_type for t in graph.initializer})
    for node in graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    types[node.output[0]] = attribute.t.data_type
    return types


# Ops that keep values as they are: a widened tensor (int4 held as int8, see ops_common) may
# pass through them; any other op would compute at the wrong width, so it is refused.
WIDENED_OK = {"QuantizeLinear", "DequantizeLinear", "Identity", "Reshape", "Transpose",
               "Squeeze", "Unsqueeze", "Flatten", "Concat", "Slice", "Gather", "Split",
               "Expand", "Tile", "Constant", "Shape", "Size", "Cast"}


def _check_widened(ctx: Ctx, node: onnx.NodeProto, types: dict[str, int]) -> None:
    if node.op_type in WIDENED_OK:
        return
    for name in list(node.input) + list(node.output):
        if types.get(name) in WIDENED_ONNX:
            kind = onnx.TensorProto.DataType.Name(types[name])
            raise ctx.unsupported(f"element type {kind} (held widened; only quantize/dequantize "
                                  "and data movement are exact on it)")


def _sorted_nodes(graph: onnx.GraphProto, known: set[str]) -> list[onnx.NodeProto]:
    """The graph's nodes in an order where each input exists before it is read (ONNX asks
    for topological order; some exporters don't keep it)."""
    pending, ordered, available = list(graph.node), [], set(known) | {""}
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            names = sorted({i for n in pending for i in n.input if i not in available})[:5]
            raise UserError(f"the graph reads tensors nothing produces: {', '.join(names)}")
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
        ordered += ready
        available.update(o for n in ready for o in n.output)
    return ordered


class Twin(torch.nn.Module):
    """A PyTorch module that computes what the ONNX model computes, with trainable weights."""

    def __init__(self, model: Model, trainable: Iterable[str] | None = None, *,
                 extra_outputs: Sequence[str] = ()) -> None:
        super().__init__()
        missing = unsupported_ops(model)
        if missing:
            raise Unsupported(f"the twin can't run this model: unsupported op(s) "
                              f"{', '.join(missing)}")
        graph = model.graph
        self.weights = torch.nn.ParameterDict()
        self.constants = torch.nn.Module()
        self._onnx_names: dict[str, str] = {}   # parameter key -> ONNX tensor name
        self._keys: dict[str, str] = {}         # ONNX tensor name -> parameter key
        self._buffers_by_name: dict[str, str] = {}
        self.input_names = [i.name for i in graph.input]
        self.output_names = [o.name for o in graph.output]
        self.extra_outputs = list(extra_outputs)
        self._input_types = {i.name: i.type.tensor_type for i in graph.input}
        taken: set[str] = set()
        for tensor in graph.initializer:
            self._hold(tensor.name, tensor, _tensor_array(tensor, model.source), taken)
        self._steps: list[tuple[onnx.NodeProto, object, Ctx, dict]] = []
        types = _element_types(graph)
        known = {t.name for t in graph.initializer} | set(self.input_names)
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ops.DEFAULT_DOMAINS:
                known.update(node.output)
        for node in _sorted_nodes(graph, known):
            fn = ops.lookup(node.domain, node.op_type)
            domain = "" if node.domain in ops.DEFAULT_DOMAINS else node.domain
            count = len(node.output)
            while count and not node.output[count - 1]:
                count -= 1
            ctx = Ctx(node, model.opset(domain), count, tuple(types.get(i, 0) for i in node.input))
            _check_widened(ctx, node, types)
            attrs = {a.name: decode_attribute(a) for a in node.attribute}
            if node.op_type == "Constant" and not domain:
                # Evaluated once: a float weight becomes a parameter, anything else a buffer.
                weight = _constant_tensor(node)
                value = fn(ctx, [], attrs) if weight is None else None
                self._hold(node.output[0], weight, value, taken)
                continue
            self._steps.append((node, fn, ctx, attrs))
        self._last_use = self._last_uses()
        # BatchNormalization's running mean and variance (inputs 3 and 4) are statistics, not
        # weights (buffers in torch): trained by AdamW, a variance of 1e-4 (a near-dead channel
        # of PP-OCR rec) went negative within five steps and sqrt(var + eps) turned NaN.
        self.statistics = {name for node in graph.node if node.op_type == "BatchNormalization"
                           for name in node.input[3:5] if name}
        self._choose_trainable(trainable)

    # -- weights ------------------------------------------------------------------------------

    def _hold(self, name: str, tensor: onnx.TensorProto | None, value, taken: set[str]) -> None:
        if tensor is not None and tensor.data_type in FLOAT_TYPES:
            key = _safe_key(name, taken)
            array = value if value is not None else numpy_helper.to_array(tensor)
            self.weights[key] = torch.nn.Parameter(to_tensor(array))
            self._onnx_names[key] = name
            self._keys[name] = key
            return
        if tensor is not None and tensor.data_type not in TORCH_DTYPES | WIDENED_ONNX:
            raise Unsupported(f"the twin can't hold tensor {name!r}: element type "
                              f"{onnx.TensorProto.DataType.Name(tensor.data_type)}")
        key = _safe_key(name, taken)
        buffer = value if isinstance(value, torch.Tensor) else to_tensor(value)
        self.constants.register_buffer(key, buffer, persistent=False)
        self._buffers_by_name[name] = key

    def _choose_trainable(self, trainable: Iterable[str] | None) -> None:
        if trainable is None:
            chosen = {name for key, name in self._onnx_names.items()
                      if self.weights[key].numel() > 1 and name not in self.statistics}
        else:
            chosen = set(trainable)
            unknown = sorted(chosen - set(self._keys))
            if unknown:
                raise UserError(f"not float weights of this model, can't train: "
                                f"{', '.join(unknown[:5])}{' …' if len(unknown) > 5 else ''}")
        for key, name in self._onnx_names.items():
            self.weights[key].requires_grad_(name in chosen)

    def onnx_name(self, key: str) -> str:
        return self._onnx_names[key]

    def parameter(self, onnx_name: str) -> torch.nn.Parameter:
        if onnx_name not in self._keys:
            raise UserError(f"{onnx_name!r} is not a float weight of this model")
        return self.weights[self._keys[onnx_name]]

    def named_weights(self) -> Iterable[tuple[str, torch.nn.Parameter]]:
        """(ONNX name, parameter) for every float weight, trainable or frozen."""
        for key, name in self._onnx_names.items():
            yield name, self.weights[key]

    def replace_op(self, output: str, fn) -> None:
        """Compute the node producing ``output`` with ``fn(ctx, inputs, attrs)`` in place of the
        op table's function (quantization-aware training swaps in fake-quantizers this way)."""
        for index, (node, _, ctx, attrs) in enumerate(self._steps):
            if output in node.output:
                self._steps[index] = (node, fn, ctx, attrs)
                return
        raise UserError(f"no node of the graph computes {output!r}")

    # -- forward ------------------------------------------------------------------------------

    def _last_uses(self) -> dict[str, int]:
        last: dict[str, int] = {}
        for index, (node, _, _, _) in enumerate(self._steps):
            for name in list(node.input) + list(node.output):
                if name:
                    last[name] = index
        return last

    def forward(self, feeds: Mapping | None = None, /, **inputs) -> dict[str, torch.Tensor]:
        """Graph outputs (and ``extra_outputs``) by name; inputs as a mapping or keywords,
        torch tensors or numpy arrays."""
        merged = {**(feeds or {}), **inputs}
        return self.run(merged, self.output_names + self.extra_outputs)

    def run(self, feeds: Mapping, outputs: Sequence[str] | None = None
            ) -> dict[str, torch.Tensor]:
        """The named tensors (graph outputs by default; any intermediate, input or weight)."""
        wanted = list(outputs) if outputs is not None else list(self.output_names)
        device = next(iter(self.weights.values())).device if len(self.weights) else None
        env: dict[str, torch.Tensor] = {}
        for name, key in self._buffers_by_name.items():
            env[name] = getattr(self.constants, key)
        for name, key in self._keys.items():
            env[name] = self.weights[key]
        env.update(self._feeds(feeds, device))
        unknown = [name for name in wanted if name not in self._last_use and name not in env]
        if unknown:
            raise UserError(f"no tensor named {', '.join(map(repr, unknown))} in the graph")
        keep = set(wanted)
        # Off the CPU, tensors the ops create (indices, masks, shapes) must land beside the
        # weights; on the CPU the device mode would only add a dispatch per op.
        on_device = torch.device(device) if device is not None and device.type != "cpu" \
            else contextlib.nullcontext()
        with on_device:
            for index, (node, fn, ctx, attrs) in enumerate(self._steps):
                args = [env[name] if name else None for name in node.input]
                while args and args[-1] is None:
                    args.pop()
                result = self._call(node, fn, ctx, args, attrs)
                for name, value in zip(node.output, result):
                    if name:
                        env[name] = value
                for name in list(node.input) + list(node.output):
                    if name and self._last_use.get(name) == index and name not in keep:
                        env.pop(name, None)
        return {name: env[name] for name in wanted}

    @staticmethod
    def _call(node, fn, ctx, args, attrs) -> tuple:
        try:
            result = fn(ctx, args, attrs)
        except UserError:
            raise
        except Exception as exc:  # a torch error here means the op table got the node wrong
            raise OurBug(f"twin: {node.op_type} node {node.name or node.output[0]!r} failed: "
                         f"{type(exc).__name__}: {exc}") from exc
        return result if isinstance(result, tuple) else (result,)

    def _feeds(self, feeds: Mapping, device) -> dict[str, torch.Tensor]:
        extra = sorted(set(feeds) - set(self.input_names))
        if extra:
            raise UserError(f"the model has no input named {', '.join(map(repr, extra))}")
        tensors = {}
        for name in self.input_names:
            if name not in feeds:
                if name in self._keys or name in self._buffers_by_name:
                    continue  # an initializer listed as an input (old IR): its stored value
                raise UserError(f"missing input {name!r}")
            value = feeds[name]
            tensor = value if isinstance(value, torch.Tensor) else to_tensor(np.asarray(value))
            self._check_feed(name, tensor)
            tensors[name] = tensor.to(device) if device is not None else tensor
        return tensors

    def _check_feed(self, name: str, tensor: torch.Tensor) -> None:
        declared = self._input_types[name]
        expected = (TORCH_DTYPES | WIDENED_ONNX).get(declared.elem_type)
        if expected is not None and tensor.dtype != expected:
            raise UserError(f"input {name!r} is {tensor.dtype}, the model wants {expected}")
        if declared.HasField("shape"):
            dims = declared.shape.dim
            fixed = [(d.dim_value, n) for d, n in zip(dims, tensor.shape)
                     if d.HasField("dim_value")]
            if len(dims) != tensor.dim() or any(want != n for want, n in fixed):
                wanted = [d.dim_value if d.HasField("dim_value") else d.dim_param or "?"
                          for d in dims]
                raise UserError(f"input {name!r} has shape {list(tensor.shape)}, the model "
                                f"wants {wanted}")

    # -- write-back ---------------------------------------------------------------------------

    def write_back(self, model: Model) -> Model:
        """A copy of ``model`` with the twin's weight values; nothing else changes. Each
        initializer is copied and given its values in turn: a whole copy first would hold the
        old values of every trained weight beside the new ones (0.5 GB more at each kd
        evaluation of clip-vit-b32)."""
        values = dict(self.named_weights())
        proto = model_shell(model.proto, graph_skip=("initializer",))
        for tensor in model.graph.initializer:
            copy = proto.graph.initializer.add()
            copy.CopyFrom(tensor)
            if tensor.name in values:
                _replace_values(copy, to_numpy(values.pop(tensor.name)), model.source)
        for node in proto.graph.node:
            weight = _constant_tensor(node)
            if weight is not None and node.output[0] in values:
                _replace_values(weight, to_numpy(values.pop(node.output[0])), model.source)
        if values:
            raise UserError(f"the model has no weight {next(iter(values))!r}: not the model of "
                            "this twin")
        return Model(proto, model.source, model.external_data)


def _typed_values(tensor: onnx.TensorProto) -> bool:
    return bool(len(tensor.float_data) or len(tensor.double_data) or len(tensor.int32_data))


def _replace_values(tensor: onnx.TensorProto, values: np.ndarray, source: Path | None) -> None:
    """Put ``values`` into ``tensor`` in place, in the field it already uses; a tensor whose
    bits are unchanged is left as it was (external data reference included)."""
    original = _tensor_array(tensor, source)
    if tuple(values.shape) != tuple(original.shape):
        raise UserError(f"weight {tensor.name!r}: shape {list(values.shape)} does not match "
                        f"the model's {list(original.shape)}")
    values = values.astype(original.dtype)
    if values.tobytes() == original.tobytes():
        return
    fresh = numpy_helper.from_array(values, tensor.name)
    if external_data_helper.uses_external_data(tensor):
        # A weight read from disk comes back inline; saving puts it in external data again.
        del tensor.external_data[:]
        tensor.ClearField("data_location")
    if tensor.HasField("raw_data") or not _typed_values(tensor):
        tensor.raw_data = fresh.raw_data
        return
    field = {onnx.TensorProto.FLOAT: "float_data", onnx.TensorProto.DOUBLE: "double_data"}.get(
        tensor.data_type, "int32_data")
    container = getattr(tensor, field)
    del container[:]
    if field == "int32_data":  # float16/bfloat16: the 16-bit patterns, one per int32
        container.extend(values.view(np.uint16).astype(np.int32).ravel().tolist())
    else:
        container.extend(values.ravel().tolist())
