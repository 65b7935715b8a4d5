"""The tests marked ``openvino`` in their own environment, from the main suite.

ONNX Runtime's OpenVINO execution provider ships in ``onnxruntime-openvino``, which replaces the
``onnxruntime`` module, so its tests cannot run in this interpreter: they run in ``.venv-ov``
(built by ``.ci/venv-ov``, which CI runs before the test command), as a subprocess, and must
pass there with the execution provider really present (the EP tests ran, not skipped)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV_PYTHON = ROOT / ".venv-ov" / "bin" / "python"
EP_TESTS = ("test_the_openvino_ep_matches_the_cpu_ep_in_fp32",
            "test_bench_through_the_openvino_ep")


@pytest.mark.skipif(not VENV_PYTHON.exists(),
                    reason="no .venv-ov here (build it with .ci/venv-ov: onnxruntime-openvino "
                           "replaces onnxruntime, so the EP's tests need their own venv)")
@pytest.mark.skipif(sys.platform != "linux", reason="onnxruntime-openvino's wheel is Linux-only")
def test_the_openvino_ep_tests_pass_in_their_own_venv():
    result = subprocess.run(
        [str(VENV_PYTHON), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "openvino",
         "-rA", "tests/test_runtime_openvino.py"],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    for name in EP_TESTS:  # the EP was there: these ran and passed, not skipped
        assert f"PASSED tests/test_runtime_openvino.py::{name}" in output, output[-4000:]
