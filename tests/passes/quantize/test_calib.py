"""Calibration statistics against independent numpy computations, and every method through the
pass."""

from __future__ import annotations

import numpy as np
import pytest
from quantize_graphs import conv_mlp, data_for

from onnxcomp.passes import quantize
from onnxcomp.passes.quantize import calib as quantize_calib
from onnxcomp.pipeline import Context

run = quantize.PASS.run


def _batches():
    rng = np.random.default_rng(5)
    # growing ranges force the histogram to double its range twice
    return [rng.standard_normal(4000).astype(np.float32) * s + 0.3 for s in (0.5, 1.0, 2.5)]


def _stats(batches):
    stats = quantize_calib.TensorStats()
    for batch in batches:
        stats.update(batch)
    return stats


def test_streamed_histogram_equals_numpy_and_minmax_scale():
    batches = _batches()
    stats = _stats(batches)
    everything = np.concatenate(batches)
    assert stats.minimum == everything.min() and stats.maximum == everything.max()
    expected, _ = np.histogram(everything, bins=stats.bins, range=(-stats.bound, stats.bound))
    # rebinning by range doubling is exact up to values sitting on an edge
    assert np.abs(stats.counts - expected).sum() <= 4
    low, high = quantize_calib.tensor_range(stats, "minmax")
    scale, zp = quantize_calib.quant_params(low, high)
    assert scale == pytest.approx((everything.max() - everything.min()) / 255, rel=1e-6)
    assert zp == round(-everything.min() / scale)


def test_percentile_matches_numpy_within_a_bin():
    batches = _batches()
    stats = _stats(batches)
    everything = np.concatenate(batches)
    width = 2 * stats.bound / stats.bins
    low, high = quantize_calib.tensor_range(stats, "percentile", 99.0)
    assert abs(high - np.percentile(everything, 99.0)) <= width
    assert abs(low - np.percentile(everything, 1.0)) <= width


def _reference_kl_threshold(counts, bound, levels):
    """Straightforward TensorRT entropy calibration, written independently with loops."""
    width = bound / len(counts)
    last = max(i for i, c in enumerate(counts) if c) + 1
    best, best_kl = last, None
    for i in range(levels, last + 1):
        p = [float(c) for c in counts[:i]]
        p[-1] += float(sum(counts[i:]))
        edges = [int(j * i / levels) for j in range(levels + 1)]
        # array_split-style chunks: the first i % levels chunks are one longer
        sizes = [i // levels + (1 if j < i % levels else 0) for j in range(levels)]
        q, start = [0.0] * i, 0
        for size in sizes:
            chunk = range(start, start + size)
            nonzero = [j for j in chunk if counts[j] != 0]
            total = sum(float(counts[j]) for j in chunk)
            for j in nonzero:
                q[j] = total / len(nonzero)
            start += size
        del edges
        ps, qs = sum(p), sum(q)
        kl = 0.0
        for pj, qj in zip(p, q):
            if pj > 0:
                kl += (pj / ps) * np.log((pj / ps) / (qj / qs if qj > 0 else 1e-12))
        if best_kl is None or kl < best_kl:
            best, best_kl = i, kl
    return best * width


def test_entropy_threshold_matches_reference():
    rng = np.random.default_rng(2)
    values = np.abs(rng.laplace(size=20000)).astype(np.float32)
    counts, _ = np.histogram(values, bins=300, range=(0, values.max()))
    ours = quantize_calib.entropy_threshold(counts, float(values.max()), levels=32)
    assert ours == pytest.approx(_reference_kl_threshold(list(counts), float(values.max()), 32))
    assert ours < values.max()  # Laplace tails are clipped


def test_mse_range_minimizes_error_on_the_data():
    rng = np.random.default_rng(3)
    values = rng.laplace(size=20000).astype(np.float32)
    stats = _stats([values])
    low, high = quantize_calib.tensor_range(stats, "mse")

    def raw_mse(lo, hi):
        scale, zp = quantize_calib.quant_params(lo, hi)
        q = np.clip(np.round(values / scale) + zp, 0, 255)
        return float(np.mean(((q - zp) * scale - values) ** 2))

    best = min(raw_mse(c * values.min(), c * values.max()) for c in quantize_calib.MSE_GRID)
    assert raw_mse(low, high) <= best * 1.05
    assert raw_mse(low, high) < raw_mse(values.min(), values.max())


def test_mse_range_takes_the_widest_clip_near_the_least_error():
    # A flat error minimum: the argmin alone moves with any small change to the histogram;
    # the widest clip within MSE_TOLERANCE of it is taken, never a narrower one.
    rng = np.random.default_rng(4)
    values = np.concatenate([rng.laplace(size=20000), rng.uniform(-12, 12, 40)])
    stats = _stats([values.astype(np.float32)])
    low, high = quantize_calib.mse_range(stats)
    edges = stats.edges()
    centers = (edges[:-1] + edges[1:]) / 2
    used = stats.counts > 0
    lo, hi = quantize_calib._clip_zero(stats.minimum, stats.maximum)
    errors = np.array([quantize_calib.histogram_mse(stats.counts[used], centers[used], c * lo,
                                                    c * hi) for c in quantize_calib.MSE_GRID])
    argmin = float(quantize_calib.MSE_GRID[int(np.argmin(errors))])
    chosen = high / hi
    assert chosen >= argmin
    assert errors[int(np.argmin(np.abs(quantize_calib.MSE_GRID - chosen)))] <= \
        errors.min() * (1 + quantize_calib.MSE_TOLERANCE) + 1e-12
    wider = quantize_calib.MSE_GRID > chosen + 1e-9
    assert np.all(errors[wider] > errors.min() * (1 + quantize_calib.MSE_TOLERANCE))


@pytest.mark.parametrize("method", quantize_calib.METHODS)
def test_every_calibration_method_runs(method):
    model = conv_mlp()
    _, record = run(model, quantize.Config(calibration=method),
                             Context(calibration=data_for(model)))
    # entropy clips the Gaussian test data hardest; every method stays close to float
    assert record.details["output_cosine"]["y"] > 0.95


def test_near_zero_activation_ranges_get_a_normal_scale():
    scale, zero_point = quantize_calib.quant_params(0.0, 1e-39)
    assert scale == 1.0 and zero_point == 0
    scale, _ = quantize_calib.quant_params(-1.0, 1.0)
    assert abs(scale - 2.0 / 255) < 1e-9


def test_histogram_survives_activations_near_the_float32_limit():
    """Found by fuzzing: a 3e38 weight gave activations whose histogram indices overflowed."""
    from onnxcomp.passes.quantize.calib import TensorStats

    stats = TensorStats()
    stats.update(np.array([1.0, 3e38, -3e38], np.float32))
    stats.update(np.array([3.3e38], np.float32))
    assert stats.counts.sum() == 4 and np.isfinite(stats.bound)


def test_clamped_statistics_pile_the_values_past_a_bound_onto_it():
    rng = np.random.default_rng(0)
    values = rng.normal(0.0, 3.0, 20000).astype(np.float32)
    stats = quantize_calib.TensorStats()
    stats.update(values)
    clamped = stats.clamped(-3.0, np.inf)
    assert clamped.minimum == -3.0 and clamped.maximum == stats.maximum
    assert clamped.counts.sum() == stats.counts.sum()
    edges = clamped.edges()
    # Nothing left below the bin that holds -3; that bin holds every value below it.
    at = int(np.searchsorted(edges, -3.0, side="right") - 1)
    assert clamped.counts[:at].sum() == 0
    assert clamped.counts[at] >= np.sum(values < edges[at])
    assert stats.minimum < -3.0  # the original is not changed


def test_mse_range_keeps_a_fixed_end_and_weighs_the_readers_error():
    rng = np.random.default_rng(1)
    stats = quantize_calib.TensorStats()
    stats.update(np.concatenate([rng.normal(-8.0, 2.0, 5000), rng.exponential(1.0, 20000)]))
    clamped = stats.clamped(-3.0, np.inf)
    low, high = quantize_calib.mse_range(clamped, (True, False))
    assert low == -3.0 and high <= clamped.maximum
    # Chosen by HardSwish's output error, the range is no worse by that error than the one
    # chosen by the tensor's own (up to the widening tolerance).
    def hardswish(x):
        return x * np.clip(x + 3.0, 0.0, 6.0) / 6.0

    by_reader = quantize_calib.mse_range(clamped, (True, False), hardswish)
    assert by_reader[0] == -3.0
    edges = clamped.edges()
    centers, counts = (edges[:-1] + edges[1:]) / 2, clamped.counts.astype(np.float64)

    def reader_error(bounds):
        return quantize_calib.histogram_mse(counts, centers, *bounds, hardswish)

    assert reader_error(by_reader) <= reader_error((low, high)) * (
        1 + quantize_calib.MSE_TOLERANCE)


def test_outputs_far_from_float_get_a_loud_note():
    """A range that clips nearly everything (percentile 51) wrecks the outputs: the record says
    so, with the cosine; the default range does not."""
    model = conv_mlp()
    data = data_for(model, 8)
    _, record = quantize.PASS.run(model, quantize.Config(calibration="percentile",
                                                         percentile=51.0),
                                  Context(calibration=data))
    loud = [n for n in record.notes if n.startswith("WARNING: the quantized outputs are far")]
    assert loud and "calibration = percentile" in loud[0]
    _, plain = quantize.PASS.run(model, quantize.Config(), Context(calibration=data))
    assert not any("far from float" in n for n in plain.notes)
