"""The HTML report: sections from the data there is, self-contained, escaped, tables without
matplotlib, and (where Debian's ``chromium`` is installed) a real browser renders it cleanly.

The fixtures under ``tests/data`` are real reports (the demo on ppocr-rec, and tiny-clip
compressed with mixed precision), with the fields the page draws and the measurers do not keep
yet added by ``tests/data/make_report_fixtures.py`` from real runs of both models.
"""

from __future__ import annotations

import base64
import builtins
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp import report_html, report_plots
from onnxcomp.report_data import changed_lines, model_breakdown, png_data_uri, similarity_sample
from onnxcomp.report_html import html_page, render_html

DATA = Path(__file__).resolve().parent / "data"
URI = re.compile(r'src="(data:image/png;base64,[A-Za-z0-9+/=]+)"')


def _load(name: str) -> dict:
    return json.loads((DATA / name).read_text())


@pytest.fixture
def demo_report() -> dict:
    return _load("report_ppocr_demo.json")


@pytest.fixture
def clip_report() -> dict:
    return _load("report_tiny_clip.json")


@pytest.fixture
def no_matplotlib(monkeypatch):
    real_import = builtins.__import__

    def refuse(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("no matplotlib here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", refuse)


def _images(text: str) -> list:
    from PIL import Image

    images = []
    for uri in URI.findall(text):
        raw = base64.b64decode(uri.split(",", 1)[1], validate=True)
        images.append(Image.open(io.BytesIO(raw)))
        images[-1].load()  # a broken PNG raises here
    return images


def assert_self_contained(text: str) -> None:
    assert "http://" not in text and "https://" not in text
    assert "<script" not in text.lower()
    assert "<link" not in text.lower()
    assert "@import" not in text and "url(" not in text
    for src in re.findall(r'src="([^"]*)"', text):
        assert src.startswith("data:image/png;base64,"), src[:60]


# --- content ----------------------------------------------------------------------------------

def test_demo_report_has_every_section(demo_report):
    pytest.importorskip("matplotlib")
    text = html_page(demo_report)
    for heading in ("Summary", "Passes", "Per-layer quantization harm (quantize)",
                    "Parameters and bytes by op type and dtype", "Latency",
                    "Fidelity per output", "Task metric (ppocr-rec)",
                    "Lines whose text changed: 6 of 100"):
        assert f"{heading}</h" in text, heading
    # 4 pictures (SQNR, bytes, latency, cosine histogram) + 6 OCR line crops, all valid PNGs
    images = _images(text)
    assert len(images) == 4 + 6
    assert all(i.format == "PNG" and i.width > 10 for i in images)
    assert "0.276x" in text  # file size ratio
    assert "No fidelity gate" in text
    assert "p2o.MatMul.10" in text  # the worst layer by SQNR is in the table
    assert "matplotlib is not installed" not in text
    assert_self_contained(text)


def test_dual_encoder_report(clip_report):
    pytest.importorskip("matplotlib")
    text = html_page(clip_report)
    assert "Passed: every output" in text
    assert "Retrieval (image_embeds / text_embeds, 256 samples)" in text
    assert "Similarity matrices on the first 24 pairs" in text
    assert "15 layers kept float" in text
    assert text.count('<span class="kept">kept float</span>') == 15
    assert len(_images(text)) == 4  # SQNR, bytes, histograms, similarity (no bench: no latency)
    assert_self_contained(text)


def test_without_matplotlib_the_tables_stay(demo_report, no_matplotlib):
    assert not report_plots.available()
    text = html_page(demo_report)
    assert "matplotlib is not installed, so 4 pictures are left out" in text
    assert "pip install &#x27;onnxcomp[report]&#x27;" in text
    assert text.count('class="missing"') == 1 + 4
    assert "<table>" in text and "p2o.MatMul.10" in text and "Latency</h2>" in text
    assert len(_images(text)) == 6  # the OCR crops need no matplotlib
    assert_self_contained(text)


def test_partial_reports_render(demo_report, clip_report):
    validate_only = {"command": "validate", "fidelity": clip_report["fidelity"], "notes": []}
    text = html_page(validate_only, plots=False)
    assert "Fidelity per output" in text and "Passes</h2>" not in text
    bench_only = {"command": "bench", "bench": demo_report["bench"], "models": {}}
    text = html_page(bench_only, plots=False)
    assert "Latency</h2>" in text and "0.676x" in text and "Fidelity" not in text
    assert "<h1>onnxcomp report</h1>" in html_page({}, plots=False)
    del demo_report["bench"]["results"][0]["times_ms"]  # falls back to min/p50/p90/p99
    if report_plots.available():
        assert len(_images(html_page({"bench": demo_report["bench"]}))) == 1


def test_report_object_and_file(tmp_path):
    from onnxcomp.report import Report

    report = Report("validate")
    report.notes.append("a note")
    path = render_html(report, tmp_path / "sub" / "report.html", plots=False)
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and "a note" in text
    assert path.stat().st_mode & 0o044  # readable by others, as the JSON next to it
    with pytest.raises(TypeError):
        html_page(["not", "a", "report"])


def test_values_are_escaped_and_images_checked(demo_report):
    demo_report["notes"] = ['<script>alert("x")</script>']
    demo_report["passes"][1]["skipped"][0][1] = "<img src=https://example.com/x.png>"
    line = demo_report["fidelity"]["task"]["changed"]["lines"][0]
    line["image"] = "https://example.com/track.png"
    line["candidate"] = "<b>bold</b>"
    text = html_page(demo_report, plots=False)
    assert "<script>" not in text and "&lt;script&gt;" in text
    assert "&lt;b&gt;bold&lt;/b&gt;" in text
    assert "not a PNG data URI, left out" in text
    assert "<img src=https" not in text
    # escaped text may still spell a URL; no element loads one
    assert not re.search(r'(src|href)="https?:', text)


# --- data helpers -----------------------------------------------------------------------------

def test_model_breakdown_counts_under_the_real_consumer():
    weight = numpy_helper.from_array(np.ones((4, 3), dtype=np.int8), "w_q")
    scale = numpy_helper.from_array(np.ones((3,), dtype=np.float32), "w_scale")
    bias = numpy_helper.from_array(np.zeros((3,), dtype=np.float32), "b")
    shape = numpy_helper.from_array(np.array([1, 3], dtype=np.int64), "shape")
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"], axis=1),
             helper.make_node("MatMul", ["x", "w"], ["y0"]),
             helper.make_node("Add", ["y0", "b"], ["y1"]),
             helper.make_node("Reshape", ["y1", "shape"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                         [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
                              [weight, scale, bias, shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    result = model_breakdown(model)
    rows = {(r["op"], r["dtype"]): r for r in result["rows"]}
    assert rows[("MatMul", "int8")] == {"op": "MatMul", "dtype": "int8", "tensors": 1,
                                        "params": 12, "bytes": 12}
    assert rows[("MatMul", "float")]["bytes"] == 12  # the scale, through DequantizeLinear
    assert rows[("Add", "float")]["params"] == 3
    assert rows[("Reshape", "int64")]["bytes"] == 16
    assert result["params"] == 12 + 3 + 3 + 2 and result["bytes"] == 12 + 12 + 12 + 16
    onnx.checker.check_model(model)


def test_model_breakdown_on_a_built_model(mlp):
    result = model_breakdown(mlp)
    assert result["params"] >= mlp.parameter_count()
    assert {r["op"] for r in result["rows"]} <= {n.op_type for n in mlp.graph.node} | {
        "(unused)", "(graph output)"}


def test_similarity_sample():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(30, 8)), rng.normal(size=(30, 8))
    sample = similarity_sample(a, b, a, b, limit=5)
    assert sample["samples"] == 5 and sample["reference"] == sample["candidate"]
    assert np.asarray(sample["reference"]).shape == (5, 5)
    assert np.all(np.abs(sample["reference"]) <= 1.0)


def test_changed_lines_puts_new_errors_first():
    labels = ["abc", "def", "ghi", "jkl"]
    reference = ["abc", "dxf", "ghi ", "jkl"]
    candidate = ["abd", "dyf", "ghi", "jkl"]
    images = [np.full((4, 6, 3), i * 40, dtype=np.uint8) for i in range(4)]
    result = changed_lines(labels, reference, candidate, images)
    assert result["count"] == 2 and result["total"] == 4
    assert [line["index"] for line in result["lines"]] == [0, 1]  # "ghi " vs "ghi": same
    assert result["lines"][0]["image"].startswith("data:image/png;base64,")
    assert changed_lines(labels, reference, candidate, limit=1)["lines"][0].keys() == {
        "index", "label", "reference", "candidate"}
    with pytest.raises(ValueError):
        changed_lines(labels, reference, candidate[:2])
    with pytest.raises(ValueError):
        png_data_uri(np.zeros((2, 2), dtype=np.float32))


# --- a real browser ---------------------------------------------------------------------------

def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _run_chromium(binary: str, page: Path, profile: Path, *args: str
                  ) -> subprocess.CompletedProcess:
    return subprocess.run(
        [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args,
         page.as_uri()],
        capture_output=True, text=True, timeout=120, check=False)


def check_in_chromium(page: Path, folder: Path, min_tables: int = 5, min_images: int = 4,
                      screenshot: Path | None = None) -> None:
    """Headless Chromium renders ``page`` with no console message, with its tables and every
    image in the DOM, and a screenshot shows text and charts (skips without Chromium)."""
    binary = _chromium()
    if binary is None:
        pytest.skip("headless Chromium not installed (Debian: apt-get install chromium)")
    text = page.read_text(encoding="utf-8")
    assert_self_contained(text)

    dom = _run_chromium(binary, page, folder / "profile", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console
    assert dom.stdout.count("<table>") >= min_tables
    assert dom.stdout.count("<img ") == text.count("<img ")
    assert text.count("<img ") >= min_images

    shot = screenshot or folder / "screenshot.png"
    done = _run_chromium(binary, page, folder / "profile", f"--screenshot={shot}",
                         "--window-size=1000,3000")
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape == (3000, 1000)
    assert (pixels < 128).mean() > 0.01  # text and charts, not a blank page
    # the pictures drew: the plot colours are on the page
    rgb = np.asarray(Image.open(shot).convert("RGB")).reshape(-1, 3).astype(int)
    blue = np.abs(rgb - np.array([0x4c, 0x72, 0xb0])).sum(axis=1) < 30
    assert blue.mean() > 0.001


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["report_ppocr_demo.json", "report_tiny_clip.json"])
def test_chromium_renders_the_page(fixture, tmp_path):
    if _chromium() is None:
        pytest.skip("headless Chromium not installed (Debian: apt-get install chromium)")
    pytest.importorskip("matplotlib")
    check_in_chromium(render_html(_load(fixture), tmp_path / "report.html"), tmp_path)


@pytest.mark.slow
def test_chromium_renders_the_page_compress_writes(tmp_path, capsys):
    """The real flow: ``compress --html`` of tiny-clip (a few seconds), its page in Chromium."""
    if _chromium() is None:
        pytest.skip("headless Chromium not installed (Debian: apt-get install chromium)")
    pytest.importorskip("matplotlib")
    from onnxcomp import zoo
    from onnxcomp.cli import main

    page = tmp_path / "report.html"
    assert main(["--quiet", "compress", str(zoo.fetch("tiny-clip")), "-o",
                 str(tmp_path / "tc.onnx"), "--recipe", "quantize:int8", "--calib",
                 "tiny-clip:16", "--html", str(page)]) == 0
    check_in_chromium(page, tmp_path, min_images=4)


@pytest.mark.zoo
@pytest.mark.slow
def test_chromium_renders_the_demo_page(tmp_path, capsys):
    """``onnxcomp demo`` (ppocr-rec, about a minute): its report.html in Chromium, with every
    section the demo has data for, the OCR line crops among the images."""
    if _chromium() is None:
        pytest.skip("headless Chromium not installed (Debian: apt-get install chromium)")
    pytest.importorskip("matplotlib")
    from onnxcomp.cli import main

    assert main(["--quiet", "demo", "--out", str(tmp_path / "demo")]) == 0
    assert "report page: " in capsys.readouterr().out
    page = tmp_path / "demo" / "report.html"
    task = json.loads((tmp_path / "demo" / "report.json").read_text())["fidelity"]["task"]
    assert task["changed"]["total"] == 100  # the lines read differently, with their images
    assert all(line["image"].startswith("data:image/png") for line in task["changed"]["lines"])
    text = page.read_text(encoding="utf-8")
    for heading in ("Summary", "Passes", "Per-layer quantization harm (quantize)",
                    "Parameters and bytes by op type and dtype", "Latency",
                    "Fidelity per output", "Task metric (ppocr-rec)"):
        assert f"{heading}</h" in text, heading
    check_in_chromium(page, tmp_path, min_images=4)


def test_chromium_console_check_catches_errors(tmp_path):
    """The console check above is not vacuous: a page that logs an error is caught."""
    binary = _chromium()
    if binary is None:
        pytest.skip("headless Chromium not installed (Debian: apt-get install chromium)")
    page = tmp_path / "bad.html"
    page.write_text("<!DOCTYPE html><p>x</p><script>console.error('boom')</script>")
    dom = _run_chromium(binary, page, tmp_path / "profile", "--dump-dom")
    assert any(":CONSOLE" in line and "boom" in line for line in dom.stderr.splitlines())


def test_module_names_no_url():
    """The renderer's own text (CSS, hints) must not bring a URL into every page."""
    source = Path(report_html.__file__).read_text()
    assert "http://" not in source and "https://" not in source
