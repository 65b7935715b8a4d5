"""A model made of several ONNX files: the manifest, tied tensors, and greedy generation.

An exported speech recognizer or vision-language model is a folder of parts (an encoder, a
projector, a decoder with and without its key/value cache, or a merged decoder) described by
``parts.json`` (format ``onnxcomp-parts/1``, docs/generative.md):

    {"format": "onnxcomp-parts/1", "task": "speech-to-text",
     "parts": [{"name": "encoder", "file": "encoder_model.onnx", "role": "encoder"},
               {"name": "decoder", "file": "decoder_model.onnx", "role": "decoder"},
               {"name": "decoder_with_past", "file": "decoder_with_past_model.onnx",
                "role": "decoder-with-past"}],
     "feeds": {"decoder.encoder_hidden_states": "encoder.last_hidden_state"},
     "generation": {"start_ids": [50258], "eos_id": 50257, "max_new_tokens": 16}}

Roles: ``encoder`` parts run once per sample, in list order; ``decoder`` is the first step,
``decoder-with-past`` every later one, ``decoder-merged`` both through an If on
``use_cache_branch`` (onnxcomp/decoders.py). Inputs are found by name (the sample's arrays, the
run-once parts' outputs, ``feeds``; ``encoder_hidden_states`` defaults to ``last_hidden_state``); the cache follows Optimum's names, ``present.X`` out and
``past_key_values.X`` in; ``attention_mask`` and ``position_ids`` are filled by the loop.
Limits: batch 1, greedy decoding (argmax of the last position's logits).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnxcomp.decoders import FLAG, PAST_PREFIX, PRESENT_PREFIX, merge_decoders, split_merged
from onnxcomp.errors import UserError

__all__ = [
    "MANIFEST",
    "Generation",
    "Manifest",
    "PartSpec",
    "Parts",
    "generate",
    "is_parts",
    "load_manifest",
    "merge_decoders",
    "open_parts",
    "split_merged",
    "tied_tensors",
]

MANIFEST = "parts.json"
MANIFEST_BYTES = 1 << 20
FORMAT = "onnxcomp-parts/1"
ROLES = ("encoder", "decoder", "decoder-with-past", "decoder-merged")
DECODER_ROLES = ROLES[1:]
MAX_NEW_TOKENS = 4096
LOOP_INPUTS = ("input_ids", "attention_mask", "position_ids", FLAG)
# Optimum's names: a decoder's cross-attention input is the encoder's last hidden state.
CONVENTIONS = {"encoder_hidden_states": "last_hidden_state"}


@dataclass(frozen=True)
class PartSpec:
    name: str
    file: str
    role: str


@dataclass(frozen=True)
class GenerationSpec:
    start_ids: tuple[int, ...]
    eos_id: int | None
    max_new_tokens: int


@dataclass(frozen=True)
class Manifest:
    folder: Path
    task: str
    parts: tuple[PartSpec, ...]
    feeds: dict[str, str]
    generation: GenerationSpec
    raw: dict = field(repr=False, default_factory=dict)

    def part(self, name: str) -> PartSpec:
        for part in self.parts:
            if part.name == name:
                return part
        raise UserError(f"{self.folder}: no part named {name!r} "
                        f"(parts: {', '.join(p.name for p in self.parts)})")

    def by_role(self, role: str) -> list[PartSpec]:
        return [p for p in self.parts if p.role == role]

    def path(self, part: PartSpec) -> Path:
        return self.folder / part.file


def is_parts(path: str | os.PathLike) -> bool:
    """A pipeline folder (holding parts.json) or the parts.json file itself."""
    path = Path(path)
    return (path.is_dir() and (path / MANIFEST).is_file()) or (
        path.name == MANIFEST and path.is_file())


def _ints(value, what: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise UserError(f"{what} must be a non-empty list of token ids, got {value!r}")
    return tuple(value)


def load_manifest(path: str | os.PathLike) -> Manifest:
    """Read and check ``parts.json`` (a folder or the file); every problem is one line."""
    path = Path(path)
    file = path / MANIFEST if path.is_dir() else path
    folder = file.parent
    try:
        if file.stat().st_size > MANIFEST_BYTES:
            raise UserError(f"{file}: {file.stat().st_size} bytes is not a manifest "
                            f"(limit {MANIFEST_BYTES})")
        raw = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no {MANIFEST} (a pipeline folder needs one)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{file}: not a readable JSON manifest ({exc})") from None
    except RecursionError:
        raise UserError(f"{file}: not a readable JSON manifest (nested too deeply)") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise UserError(f"{file}: format must be {FORMAT!r}")
    entries = raw.get("parts")
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{file}: 'parts' must be a non-empty list")
    parts = []
    for entry in entries:
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str)
                                                  for k in ("name", "file", "role")):
            raise UserError(f"{file}: each part needs string 'name', 'file' and 'role'")
        if entry["role"] not in ROLES:
            raise UserError(f"{file}: part {entry['name']!r} has role {entry['role']!r}; "
                            f"roles: {', '.join(ROLES)}")
        if Path(entry["file"]).is_absolute() or ".." in Path(entry["file"]).parts:
            raise UserError(f"{file}: part file {entry['file']!r} must stay inside the folder")
        target = folder / entry["file"]
        if target.exists() and not target.resolve().is_relative_to(folder.resolve()):
            raise UserError(f"{file}: part file {entry['file']!r} links outside the folder")
        if not target.is_file():
            raise UserError(f"{file}: part {entry['name']!r}: {target} is missing")
        parts.append(PartSpec(entry["name"], entry["file"], entry["role"]))
    names = [p.name for p in parts]
    if len(set(names)) != len(names) or len({p.file for p in parts}) != len(parts):
        raise UserError(f"{file}: part names and files must be unique")
    roles = [p.role for p in parts]
    for role in DECODER_ROLES:
        if roles.count(role) > 1:
            raise UserError(f"{file}: at most one part may have role {role!r}")
    has_pair = "decoder" in roles and "decoder-with-past" in roles
    if ("decoder" in roles) != ("decoder-with-past" in roles) or not (
            has_pair or "decoder-merged" in roles):
        raise UserError(f"{file}: needs a 'decoder' and a 'decoder-with-past' part, or a "
                        "'decoder-merged' part")
    gen = raw.get("generation") or {}
    if not isinstance(gen, dict):
        raise UserError(f"{file}: 'generation' must be an object")
    eos = gen.get("eos_id")
    if eos is not None and (not isinstance(eos, int) or isinstance(eos, bool) or eos < 0):
        raise UserError(f"{file}: generation.eos_id must be a token id, got {eos!r}")
    steps = gen.get("max_new_tokens", 16)
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= MAX_NEW_TOKENS:
        raise UserError(f"{file}: generation.max_new_tokens must be 1..{MAX_NEW_TOKENS}")
    feeds = raw.get("feeds") or {}
    if not isinstance(feeds, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                              for k, v in feeds.items()):
        raise UserError(f"{file}: 'feeds' must map 'part.input' to 'part.output'")
    for key in feeds:
        if key.split(".", 1)[0] not in names or "." not in key:
            raise UserError(f"{file}: feeds key {key!r} must be 'part.input' of a known part")
    spec = GenerationSpec(_ints(gen.get("start_ids", [0]), f"{file}: generation.start_ids"),
                          eos, steps)
    return Manifest(folder, str(raw.get("task", "")), tuple(parts), dict(feeds), spec, raw)


def model_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


class Parts:
    """An opened pipeline: the manifest, each part's ONNX model (loaded on first use) and, for
    running, an ONNX Runtime session per part."""

    def __init__(self, manifest: Manifest, threads: int | None = None, optimize: bool = True):
        self.manifest = manifest
        self.threads = threads
        self.optimize = optimize
        self._models: dict[str, onnx.ModelProto] = {}
        self._sessions: dict[str, object] = {}
        self._signatures: dict[str, tuple[list[onnx.ValueInfoProto],
                                          list[onnx.ValueInfoProto]]] = {}

    @property
    def folder(self) -> Path:
        return self.manifest.folder

    def model(self, name: str) -> onnx.ModelProto:
        if name not in self._models:
            from onnxcomp import model as model_io

            self._models[name] = model_io.load(self.manifest.path(self.manifest.part(name))).proto
        return self._models[name]

    def signature(self, name: str) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
        """(inputs that are not initializers, outputs) of a part; its weights are not kept."""
        if name not in self._signatures:
            model = self._models.get(name)
            if model is None:
                from onnxcomp import model as model_io

                model = model_io.load(self.manifest.path(self.manifest.part(name)),
                                      load_weights=False).proto
            self._signatures[name] = (model_inputs(model), list(model.graph.output))
        return self._signatures[name]

    def release(self) -> None:
        """Drop the loaded models and sessions (memory; they are made again on use)."""
        self._models.clear()
        self._sessions.clear()
        from onnxcomp import runtime

        runtime.release_free_memory()

    def session(self, name: str):
        if name not in self._sessions:
            from onnxcomp import runtime

            path = self.manifest.path(self.manifest.part(name))
            try:
                self._sessions[name] = runtime.session(path, threads=self.threads,
                                                       optimize=self.optimize)
            except UserError as exc:
                raise UserError(f"part {name!r} ({path.name}): {exc}") from None
        return self._sessions[name]

    def input_names(self, name: str) -> list[str]:
        return [i.name for i in self.session(name).get_inputs()]

    def decoder_route(self, merged: bool | None = None) -> tuple[str, str]:
        """(first-step part, later-step part); the same merged part twice for a merged decoder.
        ``merged=None`` prefers the separate files when both forms are present."""
        m = self.manifest
        pair = m.by_role("decoder") + m.by_role("decoder-with-past")
        merged_parts = m.by_role("decoder-merged")
        if merged is None:
            merged = not pair
        if merged:
            if not merged_parts:
                raise UserError(f"{m.folder}: no decoder-merged part")
            return merged_parts[0].name, merged_parts[0].name
        if not pair:
            raise UserError(f"{m.folder}: no separate decoder and decoder-with-past parts")
        return pair[0].name, pair[1].name

    def check_connections(self, sample_keys: Sequence[str]) -> None:
        """Every part input is produced by the sample, an earlier part, a feed or the loop."""
        available = set(sample_keys) | {"prompt_ids"}
        for part in self.manifest.parts:
            inputs, outputs = self.signature(part.name)
            for value in inputs:
                name = value.name
                key = f"{part.name}.{name}"
                if name not in available and CONVENTIONS.get(name) in available:
                    name = CONVENTIONS[name]
                if part.role == "encoder":
                    ok = name in available or key in self.manifest.feeds
                else:
                    ok = (name in available or key in self.manifest.feeds
                          or name in LOOP_INPUTS or name.startswith(PAST_PREFIX))
                if not ok:
                    raise UserError(f"{self.folder}: input {name!r} of part {part.name!r} is "
                                    "not a sample input, an earlier part's output or a feed")
            if part.role == "encoder":
                available |= {o.name for o in outputs}
                available |= {f"{part.name}.{o.name}" for o in outputs}


def open_parts(path: str | os.PathLike, threads: int | None = None, optimize: bool = True
               ) -> Parts:
    return Parts(load_manifest(path), threads=threads, optimize=optimize)


@dataclass(frozen=True)
class TiedTensor:
    """One tensor content present in several parts (or several times in one)."""
    digest: str
    nbytes: int
    members: tuple[tuple[str, str], ...]  # (part, initializer name)


def _digest(tensor: onnx.TensorProto) -> tuple[str, int]:
    array = onnx.numpy_helper.to_array(tensor)
    data = np.ascontiguousarray(array).tobytes()
    key = f"{array.dtype}|{array.shape}|".encode() + data
    return hashlib.sha256(key).hexdigest(), len(data)


def digests(model: onnx.ModelProto, min_bytes: int = 1024) -> list[tuple[str, str, int]]:
    """(initializer name, content digest, bytes) of every initializer of ``min_bytes`` or more."""
    out = []
    for tensor in model.graph.initializer:
        digest, nbytes = _digest(tensor)
        if nbytes >= min_bytes:
            out.append((tensor.name, digest, nbytes))
    return out


def part_bytes(path: Path) -> int:
    """A part's file and every external-data file it reads (whatever their names: Optimum
    writes ``*.onnx_data``)."""
    from onnxcomp.model import files_read

    return sum(p.stat().st_size for p in files_read(path) if p.is_file())


def tied_from(per_part: dict[str, list[tuple[str, str, int]]]) -> list[TiedTensor]:
    """Contents present in more than one place, largest first, from each part's digests."""
    groups: dict[str, list[tuple[str, str]]] = {}
    sizes: dict[str, int] = {}
    for part, entries in per_part.items():
        for name, digest, nbytes in entries:
            groups.setdefault(digest, []).append((part, name))
            sizes[digest] = nbytes
    tied = [TiedTensor(d, sizes[d], tuple(m)) for d, m in groups.items() if len(m) > 1]
    return sorted(tied, key=lambda t: -t.nbytes)


def tied_tensors(models: dict[str, onnx.ModelProto], min_bytes: int = 1024) -> list[TiedTensor]:
    """Initializers with identical contents in more than one place, largest first."""
    return tied_from({part: digests(model, min_bytes) for part, model in models.items()})


# --- greedy generation --------------------------------------------------------------------

@dataclass
class Generation:
    """What one greedy decode produced: the new tokens, each step's last-position logits and
    the times (seconds) of the run-once parts + first step, and of every later step."""
    tokens: list[int]
    logits: list[np.ndarray]
    first_token_s: float
    step_s: list[float]


def empty_past(inputs: Sequence[onnx.ValueInfoProto]) -> dict[str, np.ndarray]:
    """Zero-length caches for a merged decoder's first step, from the declared shapes."""
    feeds = {}
    for value in inputs:
        if not value.name.startswith(PAST_PREFIX):
            continue
        dims = value.type.tensor_type.shape.dim
        shape = []
        for i, dim in enumerate(dims):
            if i == 0:
                shape.append(1)
            elif dim.HasField("dim_value"):  # a fixed sequence length too (unused values)
                shape.append(dim.dim_value)
            elif i == len(dims) - 2:
                shape.append(0)
            else:
                raise UserError(f"merged decoder: past input {value.name!r} has a symbolic "
                                f"dimension {dim.dim_param!r}; its size must be fixed")
        elem = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type)
        feeds[value.name] = np.zeros(shape, elem)
    return feeds


def _past_length(past: dict[str, np.ndarray]) -> int:
    for name, array in past.items():
        if ".encoder." not in name and array.ndim >= 2:
            return int(array.shape[-2])
    return 0


class _Env:
    """Values available to part inputs: the sample, the run-once parts' outputs, the feeds."""

    def __init__(self, parts: Parts, sample: dict[str, np.ndarray]):
        self.parts = parts
        self.values: dict[str, np.ndarray] = dict(sample)

    def add(self, part: str, outputs: dict[str, np.ndarray]) -> None:
        for name, array in outputs.items():
            self.values[name] = array
            self.values[f"{part}.{name}"] = array

    def lookup(self, part: str, name: str) -> np.ndarray | None:
        source = self.parts.manifest.feeds.get(f"{part}.{name}")
        if source is not None:
            if source not in self.values:
                raise UserError(f"feed {part}.{name} <- {source}: {source!r} was not produced")
            return self.values[source]
        if name not in self.values and name in CONVENTIONS:
            return self.values.get(CONVENTIONS[name])
        return self.values.get(name)


def _run(parts: Parts, part: str, feeds: dict[str, np.ndarray],
         record: Callable[[str, dict[str, np.ndarray]], None] | None) -> dict[str, np.ndarray]:
    sess = parts.session(part)
    if record is not None:
        record(part, feeds)
    names = [o.name for o in sess.get_outputs()]
    try:
        values = sess.run(names, feeds)
    except Exception as exc:  # noqa: BLE001 (ORT raises its own classes; the message says which input)
        raise UserError(f"part {part!r} failed to run: {str(exc).splitlines()[0]}") from None
    return dict(zip(names, values))


def _decoder_feeds(parts: Parts, part: str, env: _Env, ids: np.ndarray,
                   past: dict[str, np.ndarray], first: bool, merged: bool
                   ) -> dict[str, np.ndarray]:
    feeds: dict[str, np.ndarray] = {}
    past_len = _past_length(past)
    for name in parts.input_names(part):
        if name == "input_ids":
            feeds[name] = ids
        elif name == FLAG:
            feeds[name] = np.array([not first], dtype=bool)
        elif name == "attention_mask":
            feeds[name] = np.ones((1, past_len + ids.shape[1]), np.int64)
        elif name == "position_ids":
            feeds[name] = np.arange(past_len, past_len + ids.shape[1], dtype=np.int64)[None]
        elif name.startswith(PAST_PREFIX) and name in past:
            feeds[name] = past[name]
        else:
            value = env.lookup(part, name)
            if value is None:
                raise UserError(f"part {part!r}: nothing provides input {name!r}")
            feeds[name] = value
    return feeds


def generate(parts: Parts, sample: dict[str, np.ndarray], max_new_tokens: int | None = None,
             forced: Sequence[int] | None = None, merged: bool | None = None,
             record: Callable[[str, dict[str, np.ndarray]], None] | None = None) -> Generation:
    """Greedy decoding of one sample. ``forced``: feed these tokens instead of the argmax
    (teacher forcing: the logits of a candidate along the reference's path), for len(forced)
    steps. ``record(part, feeds)`` sees every part run (calibration data per part)."""
    spec = parts.manifest.generation
    steps = len(forced) if forced is not None else (max_new_tokens or spec.max_new_tokens)
    env = _Env(parts, sample)
    start = time.perf_counter()
    for part in parts.manifest.by_role("encoder"):
        names = parts.input_names(part.name)
        feeds = {}
        for name in names:
            value = env.lookup(part.name, name)
            if value is None:
                raise UserError(f"part {part.name!r}: nothing provides input {name!r}")
            feeds[name] = value
        env.add(part.name, _run(parts, part.name, feeds, record))
    first_part, next_part = parts.decoder_route(merged)
    is_merged = first_part == next_part
    prompt = sample.get("prompt_ids")
    ids = (np.asarray(prompt, np.int64).reshape(1, -1) if prompt is not None
           else np.array([spec.start_ids], np.int64))
    past: dict[str, np.ndarray] = empty_past(parts.signature(first_part)[0]) if is_merged else {}
    tokens: list[int] = []
    logits: list[np.ndarray] = []
    step_s: list[float] = []
    first_token_s = 0.0
    for step in range(steps):
        part = first_part if step == 0 else next_part
        t0 = time.perf_counter()
        feeds = _decoder_feeds(parts, part, env, ids, past, step == 0, is_merged)
        outputs = _run(parts, part, feeds, record)
        if "logits" not in outputs:
            raise UserError(f"part {part!r} has no 'logits' output")
        last = np.asarray(outputs["logits"])[0, -1].astype(np.float32)
        token = int(np.argmax(last)) if forced is None else int(forced[step])
        for name, array in outputs.items():
            if name.startswith(PRESENT_PREFIX):
                key = PAST_PREFIX + name[len(PRESENT_PREFIX):]
                # Optimum's merged decoders fill the outputs the with-past path lacks (Whisper's
                # cross-attention cache) with empty tensors: the past keeps its value.
                if np.asarray(array).size == 0 and key in past and past[key].size > 0:
                    continue
                past[key] = array
        now = time.perf_counter()
        if step == 0:
            first_token_s = now - start
        else:
            step_s.append(now - t0)
        tokens.append(token)
        logits.append(last)
        if forced is None and spec.eos_id is not None and token == spec.eos_id:
            break
        ids = np.array([[token]], np.int64)
    return Generation(tokens, logits, first_token_s, step_s)


def iter_samples(data) -> Iterator[dict[str, np.ndarray]]:
    for batch in data:
        yield {k: np.asarray(v) for k, v in batch.items()}
