from __future__ import annotations

import pytest

import onnxcomp
from onnxcomp import runtime, zoo
from onnxcomp.passes import fuse
from onnxcomp.pipeline import Context

from conftest import make_mlp

pytest.importorskip("onnxruntime.transformers.optimizer")


@pytest.mark.zoo
def test_tiny_clip_fuses_and_stays_numerically_equal():
    model = onnxcomp.load(zoo.fetch("tiny-clip"))
    assert fuse.detect_heads(model) == (4, 64)
    fused, record = fuse.run(model, fuse.Config("clip"), Context())
    assert record.modified
    ops = {n.op_type for n in fused.graph.node}
    assert {"SkipLayerNormalization", "BiasGelu"} <= ops
    batch = zoo.dataset("tiny-clip", "eval", 1).make_batch(0)
    assert max(runtime.max_abs_difference(model, fused, batch).values()) < 1e-4
    again, second = fuse.run(fused, fuse.Config("clip"), Context())
    assert not second.modified and again is fused


def test_nothing_to_fuse_is_a_note():
    model = make_mlp()
    out, record = fuse.run(model, fuse.Config("bert"), Context())
    assert out is model and not record.modified
    assert "no bert fusion pattern matched" in record.notes[0]


def test_config_validates():
    with pytest.raises(ValueError, match="model_type"):
        fuse.Config("resnet")
    assert fuse.Config.from_short("vit").model_type == "vit"
