"""The CLI for pipelines of parts (a folder with parts.json): compress, validate, bench.

``onnxcomp.cli`` hands a command here when its model argument is a pipeline folder; the
behaviour follows the single-file commands (exit 1 and no output when fidelity misses its
gate, one clear line for a user mistake)."""

from __future__ import annotations

import sys

from onnxcomp.errors import TargetMissed, UserError

EXIT_TARGET_MISSED = TargetMissed.exit_code


def _part_recipes(values: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for value in values or []:
        name, sep, recipe = value.partition("=")
        if not sep or not name.strip():
            raise UserError(f"--part {value!r}: expected PART=RECIPE (or PART=float)")
        out[name.strip()] = recipe
    return out


def check_outputs_not_inputs(folders: list, outputs: list) -> None:
    """No report/page path is a file a pipeline reads (its parts, their data, parts.json)."""
    from onnxcomp.model import check_output_paths, files_read
    from onnxcomp.parts import MANIFEST, load_manifest

    reads = []
    for folder in folders:
        manifest = load_manifest(folder)
        reads.append(manifest.folder / MANIFEST)
        for part in manifest.parts:
            reads.extend(files_read(manifest.path(part)))
    check_output_paths(outputs, reads)


def _positive(value: int | None, flag: str, limit: int) -> int | None:
    if value is not None and not 1 <= value <= limit:
        raise UserError(f"{flag} must be 1..{limit}, got {value}")
    return value


def inspect(args) -> int:
    """The parts, their roles and sizes, the tensors the files share, the generation spec."""
    import json

    from onnxcomp.model import parameter_count
    from onnxcomp.parts import open_parts, tied_tensors
    from onnxcomp.parts_compress import groups, part_sizes
    from onnxcomp.report import markdown_table

    parts = open_parts(args.model)
    manifest = parts.manifest
    sizes = part_sizes(manifest)
    models = {p.name: parts.model(p.name) for p in manifest.parts}
    tied = tied_tensors(models)
    info = {
        "folder": str(manifest.folder), "task": manifest.task,
        "parts": [{"name": p.name, "role": p.role, "file": p.file, "bytes": sizes[p.name],
                   "parameters": parameter_count(models[p.name]),
                   "inputs": [i.name for i in models[p.name].graph.input
                              if i.name not in {t.name for t in models[p.name].graph.initializer}],
                   "outputs": [o.name for o in models[p.name].graph.output]}
                  for p in manifest.parts],
        "groups": groups(manifest),
        "tied_tensors": {"count": len(tied), "bytes": sum(t.nbytes for t in tied),
                         "largest": [[f"{part}:{name}" for part, name in t.members]
                                     for t in tied[:5]]},
        "generation": {"start_ids": list(manifest.generation.start_ids),
                       "eos_id": manifest.generation.eos_id,
                       "max_new_tokens": manifest.generation.max_new_tokens},
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    rows = [[p["name"], p["role"], p["file"], f"{p['bytes'] / 1e6:.2f}", p["parameters"],
             len(p["inputs"]), len(p["outputs"])] for p in info["parts"]]
    print(markdown_table(["part", "role", "file", "MB", "parameters", "inputs", "outputs"],
                         rows))
    print(f"\ntensors stored in more than one file: {len(tied)} "
          f"({sum(t.nbytes for t in tied) / 1e6:.2f} MB each copy); the decoder files are one "
          "compression group (compressed once, as a merged decoder)")
    return 0


def compress(args, emit) -> int:
    from onnxcomp.parts import load_manifest, open_parts
    from onnxcomp.parts_compress import check_output_folder, compress_parts, part_sizes, write_parts

    if args.dry_run:
        raise UserError("--dry-run plans one file: run it on a part's .onnx file")
    if args.min_cosine is not None:
        raise UserError("--min-cosine is for one file; a pipeline is gated per part by the "
                        "default fidelity floor and reported by generation agreement")
    reference = open_parts(args.model)
    check_output_folder(args.output, reference.manifest.folder)
    check_outputs_not_inputs([args.model], [args.report, args.html])
    recipe, per_part = args.recipe, {}
    if recipe and str(recipe).strip().endswith(".toml"):  # [[pass]] and [parts.NAME] tables
        from onnxcomp.recipe import parts_recipe

        recipe, per_part = parts_recipe(str(recipe).strip())
    from onnxcomp.parts_compress import groups

    owner = {p: g for g, members in groups(reference.manifest).items() for p in members + [g]}
    for key, value in _part_recipes(args.part).items():  # the command line wins, per group
        group = owner.get(key)
        for other in [k for k in per_part if group is not None and owner.get(k) == group]:
            del per_part[other]
        per_part[key] = value
    result = compress_parts(args.model, recipe=recipe, per_part=per_part,
                            calib=args.calib, eval_data=args.eval, overrides=args.set,
                            validate=not args.no_validate)
    written = result.passed and not result.below_floor
    if written:
        path = write_parts(reference, result, args.output)
        sizes = part_sizes(load_manifest(path))
        result.report.models["candidate"] = {"path": str(path), "parts": sizes}
        before = sum(result.report.models["reference"]["parts"].values())
        result.report.notes.append(f"pipeline size {before} -> {sum(sizes.values())} bytes "
                                   f"({sum(sizes.values()) / before:.3f}x)")
    else:
        result.report.notes.append(f"a part fell below its fidelity floor: {args.output} was "
                                   "not written")
    emit(result.report, args.json, args.report, args.html)
    if not written:
        print("onnxcomp: target missed: a part fell below its fidelity floor; nothing written",
              file=sys.stderr)
        return EXIT_TARGET_MISSED
    for verdict in result.report.verdicts:
        print(f"onnxcomp: warning: {verdict}", file=sys.stderr)
    return 0


def validate(args, emit) -> int:
    from onnxcomp.measure.generation import validate_generation
    from onnxcomp.parts import is_parts, open_parts
    from onnxcomp.parts_compress import resolve_samples
    from onnxcomp.report import Report

    if not is_parts(args.candidate):
        raise UserError(f"{args.candidate}: the reference is a pipeline folder, the candidate "
                        "must be one too (a folder with parts.json)")
    if args.min_cosine is not None:
        raise UserError("--min-cosine is for one file; a pipeline is compared by generation "
                        "(see logits_cosine_min in the report)")
    check_outputs_not_inputs([args.reference, args.candidate], [args.report, args.html])
    if args.data is None:
        raise UserError("validating a pipeline needs --data (samples: a folder of .npz or a zoo "
                        "generator such as whisper-tiny:eval:8)")
    reference, candidate = open_parts(args.reference), open_parts(args.candidate)
    count = _positive(args.count, "--count", 4096)
    samples = resolve_samples(args.data, reference, "eval", count=count or 8)
    if count:
        samples = samples.take(count)
    report = Report("validate-parts")
    report.models = {"reference": str(reference.folder), "candidate": str(candidate.folder)}
    new_tokens = _positive(args.new_tokens, "--new-tokens", 4096)
    report.generation = validate_generation(reference, candidate, samples, new_tokens)
    emit(report, args.json, args.report, args.html)
    return 0


def bench(args, emit) -> int:
    from onnxcomp.measure.generation import bench_generation
    from onnxcomp.parts import is_parts, open_parts
    from onnxcomp.parts_compress import resolve_samples
    from onnxcomp.report import Report

    for model in args.models:
        if not is_parts(model):
            raise UserError(f"{model}: bench compares pipelines with pipelines (a folder with "
                            "parts.json); bench single files separately")
    check_outputs_not_inputs(list(args.models), [args.report, args.html])
    if args.providers.strip() != "cpu":
        raise UserError("pipeline bench runs on the CPU provider only (so far)")
    threads = [int(t) for t in str(args.threads).split(",") if t.strip()]
    if len(threads) != 1 or threads[0] < 1:
        raise UserError("pipeline bench takes one --threads value")
    first = open_parts(args.models[0])
    data = args.data or (first.manifest.raw.get("zoo") and f"{first.manifest.raw['zoo']}:eval:1")
    if not data:
        raise UserError("bench of a pipeline needs --data (one sample: an .npz or a zoo generator)")
    sample = next(iter(resolve_samples(data, first, "eval", count=1)))
    report = Report("bench-parts")
    report.generation = bench_generation(
        args.models, sample, new_tokens=_positive(args.new_tokens, "--new-tokens", 4096) or 16,
        context=_positive(args.context, "--context", 1 << 16),
        runs=_positive(args.runs, "--runs", 10000), threads=threads[0],
        memory=not args.no_memory)
    emit(report, args.json, args.report, args.html)
    return 0
