"""``module:callable`` export sources: the user's own code builds the model.

The callable returns ``(torch.nn.Module, example_inputs)`` or ``(module, example_inputs,
dynamic_axes)``. Example inputs are a tensor, a tuple (positional, named after the ``forward``
parameters, else ``input_0``, …) or a dict (keyword, named by its keys). Outputs are flattened
in a fixed order and named: a tensor ``output``; tuples ``output_0``, …; dicts and Hugging Face
``ModelOutput`` by key. Axis 0 of every input and output is a dynamic ``batch`` unless
``dynamic_axes`` (``torch.onnx.export``'s format) is given.

Importing the module runs it: that is the point (it is the user's model definition), and the
reason this source is only ever taken from the command line or the API, never from a model file.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from onnxcomp.errors import UserError
from onnxcomp.export.base import Exportable, require_torch


def _import_user_module(spec: str):
    looks_like_file = spec.endswith(".py") or "/" in spec or os.sep in spec
    if looks_like_file:
        path = Path(spec)
        if not path.is_file():
            raise UserError(f"{spec}: no such Python file")
        name = f"onnxcomp_user_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise UserError(f"{spec}: cannot be imported as a Python file")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module  # dataclasses and pickling look modules up by name
        folder = str(path.resolve().parent)
        sys.path.insert(0, folder)  # so the file can import its neighbours, as `python file` can
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(name, None)
            raise UserError(f"{spec}: importing it raised {type(exc).__name__}: {exc}") \
                from exc
        finally:
            if folder in sys.path:
                sys.path.remove(folder)
        return module
    try:
        return importlib.import_module(spec)
    except ImportError as exc:
        raise UserError(f"{spec}: cannot import module ({exc})") from exc
    except Exception as exc:
        raise UserError(f"{spec}: importing it raised {type(exc).__name__}: {exc}") from exc


def prepare_callable(module_spec: str, attribute: str) -> Exportable:
    torch = require_torch()
    label = f"{module_spec}:{attribute}"
    module = _import_user_module(module_spec)
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise UserError(f"{label}: {module_spec} has no callable named {attribute!r}")
    try:
        made = factory()
    except Exception as exc:
        raise UserError(f"{label} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(made, tuple) or len(made) not in (2, 3):
        raise UserError(f"{label} must return (torch.nn.Module, example_inputs) or "
                            f"(module, example_inputs, dynamic_axes), got {type(made).__name__}")
    net, inputs = made[0], made[1]
    axes = made[2] if len(made) == 3 else None
    if not isinstance(net, torch.nn.Module):
        raise UserError(f"{label}: the first value must be a torch.nn.Module, "
                            f"got {type(net).__name__}")
    if isinstance(inputs, Mapping):
        names, values, by_name = tuple(inputs), tuple(inputs.values()), True
    elif isinstance(inputs, (tuple, list)):
        values, by_name = tuple(inputs), False
        names = _positional_names(net, len(values))
    elif isinstance(inputs, torch.Tensor):
        values, by_name = (inputs,), False
        names = _positional_names(net, 1)
    else:
        raise UserError(f"{label}: example inputs must be a tensor, a tuple or a dict of "
                            f"tensors, got {type(inputs).__name__}")
    for name, value in zip(names, values):
        if not isinstance(value, torch.Tensor):
            raise UserError(f"{label}: example input {name!r} is a {type(value).__name__}, "
                                "not a torch.Tensor")
    net.eval()
    wrapper = _flattening_wrapper(torch, net, names if by_name else None)
    try:
        with torch.no_grad():
            first = net(**dict(zip(names, values))) if by_name else net(*values)
    except Exception as exc:
        raise UserError(f"{label}: the module raised {type(exc).__name__} on its example "
                            f"inputs: {exc}") from exc
    outputs = _flatten_outputs(torch, first)
    if not outputs:
        raise UserError(f"{label}: the module returned no tensor")
    output_names = tuple(name for name, _ in outputs)
    if axes is None:
        axes = {name: {0: "batch"} for name, value in zip(names, values) if value.dim() > 0}
        axes.update({name: {0: "batch"} for name, value in outputs if value.dim() > 0})
    elif not isinstance(axes, Mapping):
        raise UserError(f"{label}: dynamic_axes must be a dict name -> {{axis: name}}")
    unknown = set(axes) - set(names) - set(output_names)
    if unknown:
        raise UserError(f"{label}: dynamic_axes names {sorted(unknown)} are neither inputs "
                            f"{list(names)} nor outputs {list(output_names)}")
    try:  # torch's two forms: {name: {axis: label}} or {name: [axis, ...]}
        axes = {key: ({int(a): str(label) for a, label in value.items()}
                      if isinstance(value, Mapping) else
                      {int(a): f"{key}_dim{int(a)}" for a in value})
                for key, value in axes.items()}
    except (TypeError, ValueError):
        raise UserError(f"{label}: dynamic_axes must map names to {{axis: label}} or to "
                            "lists of axes") from None
    return Exportable(wrapper, values, tuple(names), output_names, axes, type(net).__name__,
                      metadata={"onnxcomp.export.callable": label})


def _positional_names(net, count: int) -> tuple[str, ...]:
    try:
        parameters = [p for p in inspect.signature(net.forward).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        parameters = []
    if len(parameters) >= count:
        return tuple(p.name for p in parameters[:count])
    return tuple(f"input_{i}" for i in range(count))


def _flatten_outputs(torch, value, prefix: str = "output") -> list[tuple[str, Any]]:
    """(name, tensor) pairs in a fixed order: a tensor, tuples/lists (``output_0``, …), dicts
    and Hugging Face ``ModelOutput`` (by key); ``None`` entries are dropped."""
    if isinstance(value, torch.Tensor):
        return [(prefix, value)]
    if isinstance(value, Mapping):
        items = [(str(k), v) for k, v in value.items()]
    elif isinstance(value, (tuple, list)):
        items = [(f"{prefix}_{i}", v) for i, v in enumerate(value)]
    else:
        return []
    flat = []
    for name, item in items:
        if item is not None:
            flat.extend(_flatten_outputs(torch, item, name))
    return flat


def _flattening_wrapper(torch, net, keyword_names: Sequence[str] | None):
    class Flatten(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = net

        def forward(self, *args):
            if keyword_names is None:
                result = self.model(*args)
            else:
                result = self.model(**dict(zip(keyword_names, args)))
            return tuple(value for _, value in _flatten_outputs(torch, result))

    return Flatten().eval()
