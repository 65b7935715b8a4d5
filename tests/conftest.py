"""Shared fixtures: tiny graphs from ``builders`` (built in memory with onnx.helper)."""

from __future__ import annotations

import builders
import numpy as np
import pytest

from onnxcomp.model import Model

# Older tests import the MLP builder from here.
make_mlp = builders.mlp


@pytest.fixture
def mlp() -> Model:
    return builders.mlp()


@pytest.fixture
def conv_net() -> Model:
    return builders.conv_net()


@pytest.fixture
def attention_block() -> Model:
    return builders.attention_block()


@pytest.fixture
def gemm_layers() -> Model:
    return builders.gemm_layers()


@pytest.fixture
def shared_weights() -> Model:
    return builders.shared_weights()


@pytest.fixture
def if_graph() -> Model:
    return builders.if_graph()


@pytest.fixture
def constant_weights() -> Model:
    return builders.constant_weights()


@pytest.fixture
def feeds() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)}


@pytest.fixture
def one_torch_thread():
    """Tiny graphs: one intra-op thread (torch tests skip without torch). On the shared 2-core
    machine two threads waiting on each other made a 32×16 matmul take ~0.1 s (a kd test 22 s
    instead of 0.8 s). Test modules use it with ``pytestmark = usefixtures(...)``."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
