"""Calibration and evaluation data, and streaming intermediate activations out of ONNX Runtime.

A data source (``SRC`` on the command line) is one of:
- a folder of ``.npz`` files, each one batch: input name → array;
- a zoo generator: ``NAME``, ``NAME:N`` or ``NAME:SPLIT:N`` (``SPLIT`` is ``calib`` or ``eval``);
- ``random:N``: N batches drawn from the model's input signature (seeded).

Batches are produced lazily, so a large data set never sits in memory whole.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnxcomp.errors import UserError
from onnxcomp.model import Model

Batch = dict[str, np.ndarray]

DEFAULT_DYNAMIC_DIM = 16


@dataclass
class Dataset:
    """A sized, re-iterable source of input batches, with optional task labels per batch."""

    name: str
    count: int
    make_batch: Callable[[int], Batch]
    labels: Sequence | None = None
    # The zoo entry the data came from, so validate can attach its task metric.
    zoo_name: str | None = None
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Batch]:
        for i in range(self.count):
            yield self.make_batch(i)

    def take(self, count: int) -> Dataset:
        count = min(count, self.count)
        labels = list(self.labels)[:count] if self.labels is not None else None
        return Dataset(f"{self.name}[:{count}]", count, self.make_batch, labels, self.zoo_name)


def from_batches(batches: Sequence[Batch], name: str = "arrays", labels=None) -> Dataset:
    batches = list(batches)
    return Dataset(name, len(batches), lambda i: batches[i], labels)


def from_npz_folder(folder: str | Path) -> Dataset:
    folder = Path(folder)
    files = sorted(folder.glob("*.npz"))
    if not files:
        raise UserError(f"{folder}: no .npz files in this folder")

    def load(i: int) -> Batch:
        try:
            with np.load(files[i], allow_pickle=False) as npz:
                return {key: npz[key] for key in npz.files}
        except Exception as exc:
            raise UserError(f"{files[i]}: not a readable .npz file ({exc})") from None

    return Dataset(str(folder), len(files), load)


def _elem_dtype(value_info: onnx.ValueInfoProto) -> np.dtype:
    return onnx.helper.tensor_dtype_to_np_dtype(value_info.type.tensor_type.elem_type)


def graph_inputs(model: Model) -> list[onnx.ValueInfoProto]:
    """The real inputs (not initializers listed as inputs, as old exporters do)."""
    initializers = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def input_shape(value_info: onnx.ValueInfoProto, dims: dict[str, int] | None = None,
                batch: int = 1) -> list[int]:
    dims = dims or {}
    shape = []
    for axis, dim in enumerate(value_info.type.tensor_type.shape.dim):
        if dim.HasField("dim_value") and dim.dim_value > 0:
            shape.append(dim.dim_value)
        elif dim.dim_param and dim.dim_param in dims:
            shape.append(int(dims[dim.dim_param]))
        elif axis == 0:
            shape.append(batch)
        else:
            shape.append(DEFAULT_DYNAMIC_DIM)
    return shape


def _vocab_size(model: Model, input_name: str) -> int | None:
    """For token-id inputs: the row count of the embedding table a Gather reads with them."""
    tables = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == input_name:
            table = tables.get(node.input[0])
            if table is not None and len(table.dims) >= 1:
                return int(table.dims[0])
    return None


def random_data(model: Model, count: int, seed: int = 0, dims: dict[str, int] | None = None,
                batch: int = 1) -> Dataset:
    """Batches drawn from the input signature: normal floats, token ids below the vocabulary
    size, masks of ones, type ids of zeros."""
    inputs = graph_inputs(model)
    specs = []
    for value_info in inputs:
        dtype = _elem_dtype(value_info)
        shape = input_shape(value_info, dims, batch)
        specs.append((value_info.name, dtype, shape, _vocab_size(model, value_info.name)))

    def make(i: int) -> Batch:
        rng = np.random.default_rng(seed * 100_003 + i)
        batch_arrays = {}
        for name, dtype, shape, vocab in specs:
            lowered = name.lower()
            if np.issubdtype(dtype, np.floating):
                batch_arrays[name] = rng.standard_normal(shape).astype(dtype)
            elif dtype == np.bool_:
                batch_arrays[name] = np.ones(shape, dtype=bool)
            elif "mask" in lowered:
                batch_arrays[name] = np.ones(shape, dtype=dtype)
            elif "type" in lowered or "segment" in lowered:
                batch_arrays[name] = np.zeros(shape, dtype=dtype)
            else:
                high = vocab or 100
                batch_arrays[name] = rng.integers(0, high, size=shape).astype(dtype)
        return batch_arrays

    return Dataset(f"random:{count}", count, make)


_ZOO_SPEC = re.compile(r"^(?P<name>[a-z0-9][a-z0-9_.-]*?)(?::(?P<split>calib|eval))?(?::(?P<n>\d+))?$")


def resolve(spec: str | Path | Dataset | None, model: Model, default_count: int = 16,
            split: str = "calib", dims: dict[str, int] | None = None) -> Dataset:
    """Turn a ``SRC`` (see the module docstring) into a Dataset checked against the model.
    ``dims`` sizes named dynamic input dimensions of random data."""
    if isinstance(spec, Dataset):
        dataset = spec
    elif spec is None or str(spec) == "random":
        dataset = random_data(model, default_count, dims=dims)
    else:
        text = str(spec)
        if text.startswith("random:"):
            try:
                count = int(text.split(":", 1)[1])
            except ValueError:
                raise UserError(f"bad data source {text!r}: expected random:N") from None
            if count <= 0:
                raise UserError(f"bad data source {text!r}: N must be positive")
            dataset = random_data(model, count, dims=dims)
        elif Path(text).is_dir():
            dataset = from_npz_folder(text)
        else:
            match = _ZOO_SPEC.match(text)
            from onnxcomp import zoo  # the zoo imports this module

            if not match or match["name"] not in zoo.names():
                raise UserError(
                    f"data source {text!r} is neither a folder of .npz files, random:N, nor a zoo "
                    f"generator ({', '.join(zoo.names())})"
                )
            count = int(match["n"]) if match["n"] else default_count
            dataset = zoo.dataset(match["name"], match["split"] or split, count)
    check_dataset(dataset, model)
    return dataset


def check_batch(batch: Batch, model: Model, where: str = "batch") -> None:
    expected = {v.name: v for v in graph_inputs(model)}
    if set(batch) != set(expected):
        raise UserError(
            f"{where}: arrays {sorted(batch)} do not match the model inputs {sorted(expected)}"
        )
    for name, value_info in expected.items():
        array = batch[name]
        dims = value_info.type.tensor_type.shape.dim
        if len(dims) and array.ndim != len(dims):
            raise UserError(
                f"{where}: input {name!r} has rank {array.ndim}, the model expects {len(dims)}"
            )
        for axis, dim in enumerate(dims):
            if dim.HasField("dim_value") and dim.dim_value > 0 and array.shape[axis] != dim.dim_value:
                raise UserError(
                    f"{where}: input {name!r} has shape {list(array.shape)}, the model expects "
                    f"{dim.dim_value} on axis {axis}"
                )
        want = _elem_dtype(value_info)
        if array.dtype != want:
            raise UserError(f"{where}: input {name!r} is {array.dtype}, the model expects {want}")


def check_dataset(dataset: Dataset, model: Model) -> None:
    """Check the first batch (cheap) so a wrong data source fails before any work starts."""
    if dataset.count == 0:
        raise UserError(f"data source {dataset.name!r} is empty")
    check_batch(dataset.make_batch(0), model, where=f"{dataset.name} batch 0")


def with_outputs(model: Model, names: Sequence[str]) -> Model:
    """A copy of the model that also returns the named intermediate tensors."""
    extended = model.copy()
    present = {o.name for o in extended.graph.output}
    for name in names:
        if name not in present:
            extended.graph.output.append(onnx.ValueInfoProto(name=name))
    return extended


def stream_activations(model: Model, names: Sequence[str], data: Dataset,
                       on_batch: Callable[[int, dict[str, np.ndarray]], None],
                       progress: Callable[[int, int], None] | None = None,
                       per_segment: int | None = None) -> None:
    """Run the model over the data and hand each batch's named activations to ``on_batch``.

    Only one batch of activations is alive at a time, so memory does not grow with the data set;
    callers keep running statistics (min/max, histograms, covariances). With ``per_segment``, the
    model runs one segment at a time (``onnxcomp.segments``: at most that many of the names
    each), so only one segment's weights are in ONNX Runtime at once; ``on_batch`` is then called
    once per segment and batch with that segment's names, batches in order for each name, and
    ``progress`` counts segments."""
    from onnxcomp import runtime, segments

    if per_segment is not None:
        flow = segments.iterate(model, names, data, per_segment)
        total = len(segments.plan(model, names, per_segment))
        for done, (_, values) in enumerate(flow, start=1):
            for i, batch in enumerate(values):
                on_batch(i, batch)
            if progress:
                progress(done, total)
        return
    sess = runtime.session(with_outputs(model, names), optimize=False)
    for i, batch in enumerate(data):
        on_batch(i, runtime.run(sess, batch, list(names)))
        if progress:
            progress(i + 1, len(data))
