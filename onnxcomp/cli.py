"""The ``onnxcomp`` command: a thin shell over the Python API.

Exit codes: 0 done; 1 a stated target was missed (the report is still written); 2 bad input or
usage (one line on stderr, wherever the mistake was found: flags, recipe, data, a pass's
options); 3 an internal error, e.g. a model we produced that onnx's checker or ONNX Runtime
refuses (one line, nothing written: a bug; rerun with ONNXCOMP_DEBUG=1 for the trace).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import NoReturn

from onnxcomp.errors import OnnxcompError, OurBug, UserError

EXIT_TARGET_MISSED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3


def _shapes(values: list[str] | None) -> dict[str, list[int]]:
    shapes = {}
    for value in values or []:
        name, _, dims = value.partition("=")
        try:
            shapes[name] = [int(d) for d in dims.split(",")]
        except ValueError:
            raise UserError(f"bad --shape {value!r}: expected NAME=D,D,D") from None
        if not name or not shapes[name]:
            raise UserError(f"bad --shape {value!r}: expected NAME=D,D,D")
    return shapes


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"bad {flag} {text!r}: expected integers like 1,2") from None
    if not values or any(v <= 0 for v in values):
        raise UserError(f"bad {flag} {text!r}: expected positive integers like 1,2")
    return values


def _emit(report, as_json: bool, report_path: str | None) -> None:
    if report_path:
        report.write(report_path)
    print(report.to_json() if as_json else report.table())


def cmd_inspect(args) -> int:
    from onnxcomp.inspection import format_inspection, inspect_model

    info = inspect_model(args.model, shapes=_shapes(args.shape))
    print(json.dumps(info, indent=2, default=str) if args.json else format_inspection(info))
    return 0


def _check_output_path(model: str, output: str) -> None:
    from onnxcomp.model import same_file

    if same_file(model, output):
        raise UserError("the output path is the input model: refusing to overwrite it")
    if not output.endswith(".onnx"):
        raise UserError(f"output {output!r} should end with .onnx")


def cmd_compress(args) -> int:
    from onnxcomp import api

    if args.help_pass:
        from onnxcomp.recipe import describe_pass

        print(describe_pass(args.help_pass))
        return 0
    if not args.model or not args.output:
        raise UserError("compress needs MODEL and -o OUT (or --help-pass NAME)")
    _check_output_path(args.model, args.output)
    if args.dry_run:
        plans = api.dry_run(args.model, args.recipe, args.calib, overrides=args.set)
        if args.json:
            print(json.dumps([plan.to_dict() for plan in plans], indent=2, default=str))
        else:
            for plan in plans:
                print(plan.table())
        return 0
    if args.no_validate and args.min_cosine is not None:
        raise UserError("--min-cosine needs the fidelity check: drop --no-validate")
    result = api.compress(args.model, recipe=args.recipe, calib=args.calib, eval_data=args.eval,
                          min_cosine=args.min_cosine, overrides=args.set,
                          validate=not args.no_validate)
    if result.passed:
        path = result.model.save(args.output)
        result.report.models["candidate"]["path"] = str(path)
    else:
        result.report.notes.append(
            f"the result missed --min-cosine {args.min_cosine}: {args.output} was not written")
    _emit(result.report, args.json, args.report)
    if not result.passed:
        print(f"onnxcomp: target missed (--min-cosine {args.min_cosine}); no model written",
              file=sys.stderr)
        return EXIT_TARGET_MISSED
    return 0


def cmd_validate(args) -> int:
    from onnxcomp.measure.validate import validate

    report = validate(args.reference, args.candidate, data=args.data, count=args.count,
                      min_cosine=args.min_cosine)
    _emit(report, args.json, args.report)
    if report.fidelity and report.fidelity.get("passed") is False:
        print(f"onnxcomp: target missed (--min-cosine {args.min_cosine})", file=sys.stderr)
        return EXIT_TARGET_MISSED
    return 0


def cmd_bench(args) -> int:
    from onnxcomp.measure.bench import bench
    from onnxcomp.report import progress

    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    report = bench(args.models, providers=providers, threads=_int_list(args.threads, "--threads"),
                   batch=args.batch, runs=args.runs, warmup=args.warmup, data=args.data,
                   memory=not args.no_memory, min_seconds=args.min_seconds,
                   spinning=not args.no_spinning, progress=None if args.json else progress)
    _emit(report, args.json, args.report)
    return 0


def cmd_export(args) -> int:
    from onnxcomp.export import export
    from onnxcomp.model import same_file
    from onnxcomp.report import progress, write_json_atomic

    if same_file(args.source, args.output):
        raise UserError("the output path is the source: refusing to overwrite it")
    result = export(args.source, args.output, opset=args.opset, tolerance=args.tolerance,
                    progress=progress)
    if args.json:
        write_json_atomic(result.to_dict(), args.json)
    print(result.summary())
    if not result.ok:
        print(f"onnxcomp: the export differs from PyTorch by {result.max_abs_error:.3g} "
              f"(> --tolerance {args.tolerance})", file=sys.stderr)
        return EXIT_TARGET_MISSED
    return 0


def cmd_zoo(args) -> int:
    from onnxcomp import zoo
    from onnxcomp.report import markdown_table

    if args.zoo_command == "list":
        rows = [[e.name, e.summary, e.source] for e in zoo.ENTRIES.values()]
        print(markdown_table(["name", "what", "source"], rows))
        return 0
    path = zoo.fetch(args.name)
    print(path)
    return 0


def cmd_demo(args) -> int:
    from onnxcomp.demo import run_demo

    return run_demo(out_dir=Path(args.out), recipe=args.recipe, as_json=args.json)


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake reported like every other user error: one line, exit 2
    (argparse itself prints the usage block and the error on several lines)."""

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    from onnxcomp import __version__

    parser = _Parser(
        prog="onnxcomp", description="Compress ONNX models and prove they still work.")
    parser.add_argument("--version", action="version", version=f"onnxcomp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="compress, validate and time the default zoo model")
    demo.add_argument("--out", default="onnxcomp-demo", help="folder for the demo's outputs")
    demo.add_argument("--recipe", default=None, help="recipe to demo (default: the demo's own)")
    demo.add_argument("--json", action="store_true")
    demo.set_defaults(func=cmd_demo)

    inspect = sub.add_parser("inspect", help="ops, parameters, FLOPs, what each pass would do")
    inspect.add_argument("model")
    inspect.add_argument("--shape", action="append", metavar="NAME=D,D,D",
                         help="concrete input shape for FLOPs (repeatable)")
    inspect.add_argument("--json", action="store_true")
    inspect.set_defaults(func=cmd_inspect)

    compress = sub.add_parser("compress", help="run a compression recipe")
    compress.add_argument("model", nargs="?")
    compress.add_argument("-o", "--output")
    compress.add_argument("--help-pass", metavar="NAME", default=None,
                          help="print a pass's options (type, default, description) and exit")
    compress.add_argument("--recipe", default=None,
                          help="TOML file or short form like 'prune:0.3,lowrank:0.9,quantize:int8'")
    compress.add_argument("--calib", default=None, help="calibration data: folder of .npz, "
                          "zoo generator (ppocr-rec, ppocr-rec:64) or random:N")
    compress.add_argument("--eval", default=None, help="held-out data for the fidelity check")
    compress.add_argument("--report", default=None, help="write the JSON report here")
    compress.add_argument("--min-cosine", type=float, default=None,
                          help="exit 1 (and write no model) if any output's cosine is lower")
    compress.add_argument("--set", action="append", metavar="PASS.FIELD=VALUE",
                          help="override one option of a recipe step, e.g. "
                          "quantize.calibration=minmax or prune.heads=0.25 (repeatable)")
    compress.add_argument("--no-validate", action="store_true",
                          help="skip the fidelity check (run `onnxcomp validate` later; keeps "
                          "the reference model out of memory for very large models)")
    compress.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    compress.add_argument("--json", action="store_true")
    compress.set_defaults(func=cmd_compress)

    validate = sub.add_parser("validate", help="fidelity of a candidate against its reference")
    validate.add_argument("reference")
    validate.add_argument("candidate")
    validate.add_argument("--data", default=None)
    validate.add_argument("--count", type=int, default=None)
    validate.add_argument("--min-cosine", type=float, default=None)
    validate.add_argument("--report", default=None)
    validate.add_argument("--json", action="store_true")
    validate.set_defaults(func=cmd_validate)

    bench = sub.add_parser("bench", help="latency, throughput, memory and size")
    bench.add_argument("models", nargs="+")
    bench.add_argument("--providers", default="cpu")
    bench.add_argument("--threads", default="1")
    bench.add_argument("--batch", type=int, default=1)
    bench.add_argument("--runs", type=int, default=30)
    bench.add_argument("--warmup", type=int, default=5)
    bench.add_argument("--min-seconds", type=float, default=1.0,
                       help="keep timing past --runs until the runs span this long")
    bench.add_argument("--no-spinning", action="store_true",
                       help="idle ONNX Runtime threads sleep instead of spin-waiting "
                       "(fairer on a busy machine)")
    bench.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    bench.add_argument("--data", default=None)
    bench.add_argument("--report", default=None)
    bench.add_argument("--json", action="store_true")
    bench.set_defaults(func=cmd_bench)

    export = sub.add_parser("export", help="PyTorch / Hugging Face model → ONNX")
    export.add_argument("source")
    export.add_argument("-o", "--output", required=True)
    export.add_argument("--opset", type=int, default=17)
    export.add_argument("--tolerance", type=float, default=1e-4,
                        help="max abs error against PyTorch before exit 1")
    export.add_argument("--json", default=None, help="write the export check as JSON here")
    export.set_defaults(func=cmd_export)

    zoo = sub.add_parser("zoo", help="the model zoo")
    zoo_sub = zoo.add_subparsers(dest="zoo_command", required=True)
    zoo_sub.add_parser("list")
    fetch = zoo_sub.add_parser("fetch")
    fetch.add_argument("name")
    zoo.set_defaults(func=cmd_zoo)
    return parser


_PLEASE_REPORT = ("(a bug in onnxcomp, nothing was written; please report it; ONNXCOMP_DEBUG=1 "
                  "shows the trace)")


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    import logging

    debug = bool(os.environ.get("ONNXCOMP_DEBUG"))
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="onnxcomp: %(message)s")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return args.func(args)
    except OurBug as exc:
        if os.environ.get("ONNXCOMP_DEBUG"):
            raise
        print(f"onnxcomp: internal error: {_one_line(exc)} {_PLEASE_REPORT}", file=sys.stderr)
        return EXIT_INTERNAL
    except OnnxcompError as exc:
        print(f"onnxcomp: error: {_one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("onnxcomp: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not the user's fault: one line unless debugging
        if os.environ.get("ONNXCOMP_DEBUG"):
            raise
        print(f"onnxcomp: internal error: {type(exc).__name__}: {_one_line(exc)} "
              f"{_PLEASE_REPORT}", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
