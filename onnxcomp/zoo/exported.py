"""The zoo models exported from PyTorch once into the cache (minilm, clip-vit-b32)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from onnxcomp.export.base import Exportable


def export_once(name: str, folder: Path, source: str, prepare: Callable[[], Exportable]
                ) -> Path:
    """``folder/model.onnx``: ``prepare()`` exported once (needs [export]), tagged with ``name``.

    ``prepare`` is called only when no finished export is there, so a cached model needs
    neither torch nor the files it was exported from."""
    from onnxcomp import export

    def make() -> Exportable:
        prepared = prepare()
        prepared.metadata["onnxcomp.zoo.name"] = name
        return prepared

    return export.export_once(Path(folder) / "model.onnx", make, source)
