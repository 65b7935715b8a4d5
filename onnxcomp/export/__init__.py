"""PyTorch / Hugging Face → ONNX, checked against PyTorch in ONNX Runtime.

``export(SOURCE, OUTPUT)`` takes

- a local Hugging Face model folder (``config.json`` + ``model.safetensors`` or
  ``pytorch_model.bin``): BERT-like encoders and ``CLIPModel`` (see :mod:`onnxcomp.export.hf`);
  a sentence-transformers folder is exported with its pooling, so the graph gives sentence
  embeddings directly;
- ``module:callable``: a Python file (``path/to/file.py:make``) or an importable module
  (``package.module:make``) whose callable returns ``(torch.nn.Module, example_inputs)``
  (see :mod:`onnxcomp.export.callable`). This imports and runs the user's code, by design: it
  is the user's own model definition (model folders, by contrast, are data: weights are read
  with safetensors or transformers' weights-only loading, and remote code is refused).

Exporter: ``torch.onnx.export(..., dynamo=False)``, the TorchScript exporter. Measured by
``benchmarks/export.py --compare-exporters`` (torch 2.13, transformers 5.23, all-MiniLM-L6-v2):
both exporters give Linear layers as MatMul + Add and match PyTorch alike (2.6e-6), but the
TorchScript one exported in about 1 s against 10 s, wrote the opset asked for (the dynamo one
wrote 18 when asked for 17), keeps module paths in node names
(``/model/encoder/layer.0/attention/self/query/MatMul``, which name-based exclusions and reports
use), needs no ``onnxscript``, and its graph is the one ONNX Runtime's BERT fusion (the ``fuse``
pass) recognizes: 6 of 6 attention blocks fused, against 0 in the dynamo graph. Its small shape
``Constant`` nodes (164 in MiniLM) are left to the cleanup pass.

After export: parameters that the exporter merged because their values were equal (zero biases,
unit norm weights: one tensor read through ``Identity`` nodes by every layer) get their own
initializers again, so a pass that cuts one layer's tensor can't change the others. The model
is checked by ``onnx.checker``, saved with :func:`onnxcomp.model.save` (external data past
~1.8 GB) and run in ONNX Runtime (CPU, graph optimizations off) against PyTorch on inputs of
other shapes than the export example: per output the max abs error and cosine similarity.
A result over ``tolerance`` is reported (``ExportResult.ok`` is false), not raised: the file is
written either way, and the CLI is to exit 1 as for any missed target.
"""

from __future__ import annotations

import os
from pathlib import Path

from onnxcomp.errors import UserError
from onnxcomp.export.base import (
    EXTRA_HINT,
    TOLERANCE,
    Exportable,
    ExportResult,
    Progress,
    _check_opset,
    cached_export,
    export_once,
    export_prepared,
    require_torch,
    split_shared_initializers,
)

__all__ = [
    "ExportResult",
    "Exportable",
    "cached_export",
    "export",
    "export_once",
    "export_prepared",
    "hf_module",
    "prepare",
    "require_torch",
    "split_shared_initializers",
]


def hf_module():
    """:mod:`onnxcomp.export.hf` (imports transformers), or the one-line error."""
    require_torch()
    try:
        from onnxcomp.export import hf as export_hf
    except ImportError as exc:
        raise UserError(f"{EXTRA_HINT} ({exc})") from None
    return export_hf


def export(source: str | os.PathLike, output: str | os.PathLike, opset: int = 17,
           tolerance: float = TOLERANCE, progress: Progress | None = None) -> ExportResult:
    """Export SOURCE (Hugging Face folder or ``module:callable``) to OUTPUT and check it."""
    say = progress or (lambda message: None)
    _check_opset(opset)
    require_torch()
    say(f"loading {source}")
    prepared = prepare(source)
    return export_prepared(prepared, output, opset=opset, tolerance=tolerance,
                           source=str(source), progress=say)


def prepare(source: str | os.PathLike) -> Exportable:
    text = str(source)
    path = Path(text)
    if path.is_dir():
        return hf_module().prepare_folder(path)
    if path.is_file():
        raise UserError(f"{path}: a file; expected a Hugging Face model folder or "
                            "module:callable (e.g. model.py:make)")
    module_part, sep, attribute = text.rpartition(":")
    if sep and module_part and attribute.isidentifier():
        from onnxcomp.export.callable import prepare_callable

        return prepare_callable(module_part, attribute)
    raise UserError(f"{text}: no such folder; expected a Hugging Face model folder or "
                        "module:callable (e.g. model.py:make)")
