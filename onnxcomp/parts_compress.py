"""Compress a pipeline of ONNX parts as one model: per-part recipes, tied weights kept tied.

The unit is the pipeline folder (onnxcomp/parts.py). Parts are grouped: every run-once part
(encoder, projector) is its own group; all decoder files (first step, with past, merged) are one
group, compressed ONCE as one graph holding both decoder paths side by side
(``decoders.side_by_side``): a weight the files share is one initializer read by both paths, so
it is quantized, factored or pruned once, with calibration, GPTQ statistics and mixed precision
working as on any model; the files written back (``split_side_by_side``, and ``merge_decoders``
for a merged file) hold byte-identical weights under the same names.

Calibration and held-out data are pipeline samples (``input_features``, ``pixel_values``,
optional ``prompt_ids``); each part is calibrated on what it really sees: the reference
pipeline's greedy generation is run on the samples and every part's inputs are recorded
(a decoder step per generated token; each with-past step is paired with its sample's first
step for the side-by-side graph).

Limits: the output folder must not exist or be empty; the decoder files must be one first-step
and one with-past path (or a merged file holding them).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from onnxcomp import calibration, progress
from onnxcomp.decoders import (
    FIRST,
    FLAG,
    LATER,
    merge_decoders,
    side_by_side,
    split_merged,
    split_side_by_side,
)
from onnxcomp.errors import UserError
from onnxcomp.model import Model, check_output_path, files_read
from onnxcomp.parts import (
    DECODER_ROLES,
    MANIFEST,
    Manifest,
    Parts,
    digests,
    generate,
    open_parts,
    part_bytes,
    tied_from,
    tied_tensors,
)
from onnxcomp.report import Report

DECODER_GROUP = "decoder"
FLOAT = ("float", "none", "")
# Decoder steps recorded per part for calibration / the per-part fidelity check.
MAX_RECORDED = 48


@dataclass
class PartsResult:
    report: Report
    # part name -> the compressed model (absent: written unchanged)
    models: dict[str, Model] = field(default_factory=dict)
    passed: bool = True
    below_floor: bool = False


def groups(manifest: Manifest) -> dict[str, list[str]]:
    """group name -> its parts: each run-once part alone, every decoder file in one group."""
    out: dict[str, list[str]] = {}
    for part in manifest.parts:
        key = DECODER_GROUP if part.role in DECODER_ROLES else part.name
        out.setdefault(key, []).append(part.name)
    return out


def group_recipes(manifest: Manifest, recipe, per_part: dict | None) -> dict:
    """The recipe of each group (a short form, a TOML path or parsed steps; None: float):
    ``recipe`` for all, ``per_part`` (part or group name -> recipe, or ``float``) on top; a
    decoder file's name addresses the whole decoder group."""
    grouped = groups(manifest)
    owner = {part: g for g, members in grouped.items() for part in members}
    chosen: dict = dict.fromkeys(grouped, recipe)
    given: dict = {}
    for key, value in (per_part or {}).items():
        group = key if key in grouped else owner.get(key)
        if group is None:
            raise UserError(f"--part {key}=...: no part or group named {key!r} (parts: "
                            f"{', '.join(p.name for p in manifest.parts)}; group: decoder)")
        if isinstance(value, str):
            value = value.strip()
        if group in given and given[group] != value:
            raise UserError(f"--part: the decoder files are one group (tied weights); "
                            f"{key!r} and another decoder part name different recipes")
        given[group] = value
        is_float = isinstance(value, str) and value.lower() in FLOAT
        chosen[group] = None if is_float else value
    return chosen


def _record(parts: Parts, samples: list[dict], what: str) -> dict[str, list[list[dict]]]:
    """part -> per sample, the feeds of every run of that part during greedy generation."""
    log = progress.current()
    recorded: dict[str, list[list[dict]]] = {p.name: [] for p in parts.manifest.parts}
    with log.task(f"recording part inputs ({what})", total=len(samples)) as task:
        for sample in samples:
            runs: dict[str, list[dict]] = {p: [] for p in recorded}
            generate(parts, sample, record=lambda part, feeds, runs=runs: runs[part].append(
                dict(feeds)))
            for part, feeds in runs.items():
                recorded[part].append(feeds)
            task.advance()
    return recorded


def _spread(batches: list[dict], limit: int) -> list[dict]:
    if len(batches) <= limit:
        return batches
    picks = np.linspace(0, len(batches) - 1, limit).round().astype(int)
    return [batches[i] for i in sorted(set(picks))]


def _dataset(batches: list[dict], name: str) -> calibration.Dataset | None:
    if not batches:
        return None
    return calibration.from_batches(_spread(batches, MAX_RECORDED), name=name)


def resolve_samples(spec, parts: Parts, split: str, count: int = 8) -> calibration.Dataset:
    """Pipeline samples from a SRC: a folder of .npz / an .npz file, or a zoo generator."""
    if isinstance(spec, calibration.Dataset):
        data = spec
    else:
        text = str(spec)
        path = Path(text)
        if path.is_dir():
            data = calibration.from_npz_folder(path)
        elif path.is_file() and text.endswith(".npz"):
            data = calibration.from_npz_files([path], text)
        else:
            from onnxcomp import zoo

            found = calibration.zoo_source(text)
            if found is None:
                raise UserError(f"pipeline data {text!r} is neither a folder of .npz files nor "
                                f"a zoo generator ({', '.join(zoo.names())})")
            name, chosen_split, chosen_count = found
            data = zoo.dataset(name, chosen_split or split, chosen_count or count)
    first = next(iter(data), None)
    if first is None:
        raise UserError(f"pipeline data {data.name}: no samples")
    parts.check_connections(list(first))
    return data


def check_output_folder(output: str | os.PathLike, source: Path) -> Path:
    target = Path(output)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UserError(f"{target}: the output folder must not exist or be empty")
    if target.resolve() == source.resolve():
        raise UserError(f"{target}: the output folder is the input pipeline")
    check_output_path(target / MANIFEST)
    return target


def compress_parts(source: str | os.PathLike, recipe=None, per_part: dict | None = None, calib=None, eval_data=None,
                   overrides: list[str] | None = None, validate: bool = True) -> PartsResult:
    """Compress every part of the pipeline at ``source`` by its group's recipe (in memory; see
    :func:`write_parts`). Fidelity: each compressed group against its reference on the recorded
    held-out feeds, then the whole pipeline by greedy generation (measure/generation.py)."""
    from onnxcomp import api

    reference = open_parts(source)
    manifest = reference.manifest
    recipes = group_recipes(manifest, recipe, per_part)
    report = Report("compress-parts")
    report.models["reference"] = {"path": str(manifest.folder), "task": manifest.task,
                                  "parts": part_sizes(manifest)}
    # Content digests a part at a time: the parts' weights are not all held at once.
    found = {}
    for part in manifest.parts:
        found[part.name] = digests(reference.model(part.name))
        reference.release()
    tied = tied_from(found)
    report.models["tied_tensors"] = {"groups": len(tied), "bytes": sum(t.nbytes for t in tied),
                                     "largest": [list(m) for t in tied[:3] for m in t.members]}
    calib_set = resolve_samples(calib, reference, "calib") if calib is not None else None
    eval_set = resolve_samples(eval_data, reference, "eval") if eval_data is not None else (
        _zoo_eval(calib, calib_set))
    calib_feeds = _record(reference, list(calib_set), "calibration") if calib_set else None
    eval_feeds = _record(reference, list(eval_set), "held-out") if eval_set else None
    reference.release()  # the sessions of the recording runs
    result = PartsResult(report)
    report.passes = []
    report.models["groups"] = {}
    for group, members in groups(manifest).items():
        chosen = recipes[group]
        if chosen is None:
            report.models["groups"][group] = {"recipe": "float", "parts": members}
            continue
        (unit,) = _units(reference, group, members, calib_feeds, eval_feeds)
        progress.current()(f"compressing {unit.label} with {_describe(chosen)}")
        out = api.compress(unit.model, recipe=chosen, calib=unit.calib,
                           eval_data=unit.evaluation, overrides=overrides, validate=validate)
        report.passes.extend(out.report.passes)
        report.notes.extend(f"{unit.label}: {n}" for n in out.report.notes)
        report.verdicts.extend(f"{unit.label}: {v}" for v in out.report.verdicts)
        report.models["groups"][group] = {"recipe": _describe(chosen), "parts": members,
                                          "fidelity": out.report.fidelity}
        result.passed &= out.passed
        result.below_floor |= out.below_floor
        result.models.update(_assemble(manifest, group, members, out.model))
        reference.release()
    _check_ties(manifest, found, result, report)
    if validate:
        from onnxcomp.measure.generation import validate_generation

        with tempfile.TemporaryDirectory(prefix=".onnxcomp-parts-", dir=manifest.folder.parent
                                         if os.access(manifest.folder.parent, os.W_OK)
                                         else None) as scratch:
            write_parts(reference, result, Path(scratch) / "candidate")
            samples = eval_set or calib_set
            if samples is None:
                report.notes.append("no --calib/--eval samples: generation not validated")
            else:
                candidate = open_parts(Path(scratch) / "candidate")
                report.generation = validate_generation(reference, candidate, samples)
    return result


def _describe(recipe) -> str:
    if isinstance(recipe, list):
        return ",".join(f"{step.name}:{getattr(step.config, 'mode', '')}".rstrip(":")
                        for step in recipe)
    return str(recipe)


def _check_ties(manifest: Manifest, before: dict[str, list], result: PartsResult,
                report: Report) -> None:
    """The decoder files must still share weights byte for byte where they did before."""
    decoders = [p.name for p in manifest.parts if p.role in ("decoder", "decoder-with-past")]
    if len(decoders) != 2 or not all(d in result.models for d in decoders):
        return
    tied_before = tied_from({d: before[d] for d in decoders})
    tied_after = tied_tensors({d: result.models[d].proto for d in decoders})
    report.models["tied_tensors"]["after"] = {"groups": len(tied_after),
                                              "bytes": sum(t.nbytes for t in tied_after)}
    if tied_before and not tied_after:
        report.verdicts.append("the decoder files no longer share any weight byte for byte")


def _zoo_eval(calib, calib_set):
    """Held-out samples when none are given: the zoo's split that pairs with the calibration
    split (``speech-calib`` -> ``speech``, else ``eval``)."""
    if calib_set is None or not calib_set.zoo_name:
        return None
    from onnxcomp import zoo

    found = calibration.zoo_source(str(calib)) if isinstance(calib, str) else None
    split = found[1] if found else None
    held_out = split[: -len("-calib")] if split and split.endswith("-calib") else "eval"
    if held_out not in zoo.entry(calib_set.zoo_name).splits:
        held_out = "eval"
    return zoo.dataset(calib_set.zoo_name, held_out, 8)


def part_sizes(manifest: Manifest) -> dict[str, int]:
    return {part.name: part_bytes(manifest.path(part)) for part in manifest.parts}


@dataclass
class _Unit:
    """One model a group is compressed as, with the feeds recorded for it."""
    label: str
    model: Model
    calib: calibration.Dataset | None
    evaluation: calibration.Dataset | None


def _flat(feeds, part: str) -> list[dict]:
    return [b for runs in feeds[part] for b in runs]


def _paired(first_runs: list[list[dict]], later_runs: list[list[dict]]) -> list[dict]:
    """Side-by-side batches: each later step of a sample beside that sample's first step."""
    batches = []
    for firsts, laters in zip(first_runs, later_runs):
        for index, later in enumerate(laters):
            first = firsts[min(index, len(firsts) - 1)] if firsts else None
            if first is not None:
                batches.append({**{f"{FIRST}/{k}": v for k, v in first.items()},
                                **{f"{LATER}/{k}": v for k, v in later.items()}})
    return batches


def _units(reference: Parts, group: str, members: list[str], calib_feeds, eval_feeds
           ) -> list[_Unit]:
    """What a group is compressed as: a run-once part itself; the decoder group as ONE graph
    holding the first-step and with-past paths side by side (decoders.side_by_side), so every
    weight the files share is compressed once, with calibration, GPTQ statistics and mixed
    precision at the top level."""
    manifest = reference.manifest
    if group != DECODER_GROUP:
        name = members[0]

        def pick_part(feeds):
            return _dataset(_flat(feeds, name), f"{name} inputs") if feeds else None

        return [_Unit(name, Model(reference.model(name), manifest.folder),
                      pick_part(calib_feeds), pick_part(eval_feeds))]
    first, later = reference.decoder_route()
    if first == later:  # only a merged file: its two paths, its feeds split by the flag
        first_model, later_model = split_merged(reference.model(first))
        names = {FIRST: {i.name for i in first_model.graph.input},
                 LATER: {i.name for i in later_model.graph.input}}

        def runs_of(feeds, tag: str, flag: bool) -> list[list[dict]]:
            return [[{k: v for k, v in b.items() if k in names[tag]}
                     for b in runs if bool(b[FLAG][0]) == flag] for runs in feeds[first]]

        def pick(feeds):
            if feeds is None:
                return None
            return _dataset(_paired(runs_of(feeds, FIRST, False), runs_of(feeds, LATER, True)),
                            "decoder steps")
    else:
        first_model, later_model = reference.model(first), reference.model(later)

        def pick(feeds):
            return (_dataset(_paired(feeds[first], feeds[later]), "decoder steps")
                    if feeds is not None else None)
    both = side_by_side(first_model, later_model)
    return [_Unit("decoder (both paths)", Model(both, manifest.folder), pick(calib_feeds),
                  pick(eval_feeds))]


def _assemble(manifest: Manifest, group: str, members: list[str], output: Model
              ) -> dict[str, Model]:
    """The part files from a group's compressed model."""
    if group != DECODER_GROUP:
        return {members[0]: output}
    first_step, with_past = split_side_by_side(output.proto)
    out = {}
    for part in manifest.parts:
        if part.role == "decoder":
            out[part.name] = Model(first_step)
        elif part.role == "decoder-with-past":
            out[part.name] = Model(with_past)
        elif part.role == "decoder-merged":
            out[part.name] = Model(merge_decoders(first_step, with_past))
    return out


def write_parts(reference: Parts, result: PartsResult, output: str | os.PathLike) -> Path:
    """Write the compressed pipeline folder atomically: staged beside ``output``, then moved;
    parts without a compressed model are copied (with their external data)."""
    manifest = reference.manifest
    target = check_output_folder(output, manifest.folder)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".onnxcomp-", dir=target.parent))
    try:
        for part in manifest.parts:
            destination = staging / part.file
            destination.parent.mkdir(parents=True, exist_ok=True)
            if part.name in result.models:
                result.models[part.name].save(destination)
            else:
                source = manifest.path(part)
                shutil.copyfile(source, destination)
                for read in files_read(source)[1:]:  # its external data, beside it as named
                    relative = read.relative_to(source.parent.resolve())
                    (destination.parent / relative).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(read, destination.parent / relative)
        (staging / MANIFEST).write_text(json.dumps(manifest.raw, indent=2) + "\n")
        if target.exists():
            target.rmdir()
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
