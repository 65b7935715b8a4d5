"""Training on ONNX graphs (the ``[train]`` extra, needs torch).

``Twin`` is the differentiable PyTorch twin of an ONNX graph: it runs the graph with PyTorch ops,
exposes the model's float weights as parameters and writes trained values back into the same
tensors. ``unsupported_ops`` says up front which ops of a model it can't run. Import this
package only where torch is wanted: nothing else in onnxcomp imports it.
"""

from __future__ import annotations

from onnxcomp.train.ops import supported_ops
from onnxcomp.train.twin import Twin, unsupported_ops

__all__ = ["Twin", "supported_ops", "unsupported_ops"]
