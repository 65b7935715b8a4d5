"""onnxcomp: an ONNX graph-level compression compiler.

    import onnxcomp as oc
    model = oc.load("clip.onnx")
    result = oc.compress(model, recipe="quantize:int8", calib="calib/")
    result.model.save("clip.small.onnx"); print(result.report.table())
"""

from __future__ import annotations

__version__ = "0.1.0"

from onnxcomp.errors import InvalidOutput, OnnxcompError, OurBug, UnsafeModelError, UserError
from onnxcomp.model import Model, load, save


def compress(*args, **kwargs):
    from onnxcomp.api import compress as _compress

    return _compress(*args, **kwargs)


def validate(*args, **kwargs):
    from onnxcomp.measure.validate import validate as _validate

    return _validate(*args, **kwargs)


def bench(*args, **kwargs):
    from onnxcomp.measure.bench import bench as _bench

    return _bench(*args, **kwargs)


def search(*args, **kwargs):
    """Recipe search (the [search] extra: optuna, ray optional); see onnxcomp.search."""
    from onnxcomp.search import search as _search

    return _search(*args, **kwargs)


def inspect(*args, **kwargs):
    from onnxcomp.inspection import inspect_model

    return inspect_model(*args, **kwargs)


__all__ = [
    "InvalidOutput",
    "Model",
    "OnnxcompError",
    "OurBug",
    "UnsafeModelError",
    "UserError",
    "__version__",
    "bench",
    "compress",
    "inspect",
    "load",
    "save",
    "search",
    "validate",
]


def compress_parts(*args, **kwargs):
    """Compress a pipeline folder (parts.json); write it with ``onnxcomp.parts_compress
    .write_parts``. See docs/generative.md."""
    from onnxcomp.parts_compress import compress_parts as _compress_parts

    return _compress_parts(*args, **kwargs)


def open_parts(*args, **kwargs):
    """Open a pipeline folder (parts.json): its manifest, parts and greedy generation."""
    from onnxcomp.parts import open_parts as _open_parts

    return _open_parts(*args, **kwargs)
