"""The ``onnxcomp`` command: a thin shell over the Python API.

Every command that measures writes its report as JSON (``--report``) and, with ``--html FILE``,
as one self-contained HTML page rendered from it (``onnxcomp report REPORT.json --html FILE``
re-renders an old one). Progress goes to stderr (bars on a terminal, plain lines elsewhere;
``--quiet``: none).

Exit codes: 0 done; 1 a stated target was missed (the report is still written); 2 bad input or
usage (one line on stderr, wherever the mistake was found: flags, recipe, data, a pass's
options); 3 an internal error, e.g. a model we produced that onnx's checker or ONNX Runtime
refuses (one line, nothing written: a bug; rerun with ONNXCOMP_DEBUG=1 for the trace).
"""

from __future__ import annotations

import argparse
import contextlib
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


def _emit(report, as_json: bool, report_path: str | None, html_path: str | None = None
          ) -> None:
    if report_path:
        report.write(report_path)
    if html_path:
        from onnxcomp.report_html import render_html

        render_html(report, html_path)  # atomic, like the JSON
    print(report.to_json() if as_json else report.table())


def _check_writable(path: str | None, flag: str) -> None:
    """Refuse now (exit 2, nothing computed) a path the command could not write at the end: a
    folder, or a place with no writable folder above it. Creates nothing."""
    if not path:
        return
    target = Path(path)
    if target.is_dir():
        raise UserError(f"{flag} {path}: is a folder, expected a file name")
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent  # the folders missing in between are created at the end
    if not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: cannot write in {parent}")


def _check_outputs(*outputs: tuple[str | None, str]) -> None:
    """Every file the command writes at the end can be written, and no two are the same."""
    named = [(path, flag) for path, flag in outputs if path]
    for path, flag in named:
        _check_writable(path, flag)
    seen: dict[Path, str] = {}
    for path, flag in named:
        key = Path(os.path.abspath(path))
        if key in seen:
            raise UserError(f"{flag} and {seen[key]} name the same file {path}")
        seen[key] = flag


def _is_parts(path: str) -> bool:
    from onnxcomp.parts import is_parts

    return is_parts(path)


def cmd_inspect(args) -> int:
    from onnxcomp.inspection import format_inspection, inspect_model

    if _is_parts(args.model):
        from onnxcomp import cli_parts

        return cli_parts.inspect(args)
    info = inspect_model(args.model, shapes=_shapes(args.shape))
    print(json.dumps(info, indent=2, default=str) if args.json else format_inspection(info))
    return 0


def _check_output_path(model: str, output: str) -> None:
    if not output.endswith(".onnx"):
        raise UserError(f"output {output!r} should end with .onnx")


def _check_not_inputs(models: list[str], outputs: list[str | None]) -> None:
    """No output (nor the data file beside an output model) is a file an input model reads:
    compared by device and inode, hard links included, before any work."""
    from onnxcomp.model import check_output_paths, files_read

    reads = [path for model in models for path in files_read(model)]
    check_output_paths(outputs, reads)


def cmd_compress(args) -> int:
    from onnxcomp import api

    if args.help_pass:
        from onnxcomp.recipe import describe_pass

        print(describe_pass(args.help_pass))
        return 0
    if not args.model or not args.output:
        raise UserError("compress needs MODEL and -o OUT (or --help-pass NAME)")
    if _is_parts(args.model):
        _check_outputs((args.report, "--report"), (args.html, "--html"))
        if args.target not in (None, "ort-cpu"):
            raise UserError("--target applies to one ONNX model, not to a pipeline folder")
        if args.shape:
            raise UserError("--shape applies to one ONNX model, not to a pipeline folder")
        from onnxcomp import cli_parts

        return cli_parts.compress(args, _emit)
    if args.part:
        raise UserError("--part applies to a pipeline folder (with parts.json)")
    _check_output_path(args.model, args.output)
    from onnxcomp import targets
    from onnxcomp.recipe import recipe_target

    chosen = targets.get(recipe_target(args.recipe, args.target))  # the flag wins
    mobile = targets.ort_paths(args.output) if chosen.writes_ort else ()
    if not args.dry_run:
        _check_outputs((args.output, "-o"), (args.report, "--report"),
                       (args.html, "--html"), *((str(p), "--target ort-mobile") for p in mobile))
        _check_not_inputs([args.model], [args.output, args.report, args.html,
                                         *map(str, mobile)])
    if args.dry_run:
        plans = api.dry_run(args.model, args.recipe, args.calib, overrides=args.set,
                            target=args.target)
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
                          validate=not args.no_validate, target=args.target,
                          speed_check=not args.no_speed_check, shapes=_shapes(args.shape))
    if result.passed and not result.below_floor:
        path = result.model.save(args.output)
        result.report.models["candidate"]["path"] = str(path)
        if mobile:  # ort-mobile: the .ort file and its operator config beside it
            ort_path, ops_config = targets.write_ort(path)
            result.report.models["candidate"].update(ort_path=str(ort_path),
                                                     required_operators=str(ops_config))
    elif not result.passed:
        result.report.notes.append(
            f"the result missed --min-cosine {args.min_cosine}: {args.output} was not written")
    else:
        result.report.notes.append(f"below the default fidelity floor: {args.output} was not "
                                   "written (set --min-cosine to choose another gate)")
    _emit(result.report, args.json, args.report, args.html)
    if not result.passed:
        print(f"onnxcomp: target missed (--min-cosine {args.min_cosine}); no model written",
              file=sys.stderr)
        return EXIT_TARGET_MISSED
    if result.below_floor:
        floor = next(v for v in result.report.verdicts if v.startswith("below"))
        print(f"onnxcomp: target missed: {floor}; no model written", file=sys.stderr)
        return EXIT_TARGET_MISSED
    for verdict in result.report.verdicts:  # e.g. "not worth it": the model is still written
        print(f"onnxcomp: warning: {verdict}", file=sys.stderr)
    return 0


def cmd_validate(args) -> int:
    from onnxcomp.measure.validate import validate

    _check_outputs((args.report, "--report"), (args.html, "--html"))
    if _is_parts(args.reference):
        from onnxcomp import cli_parts

        return cli_parts.validate(args, _emit)
    _check_not_inputs([args.reference, args.candidate], [args.report, args.html])
    report = validate(args.reference, args.candidate, data=args.data, count=args.count,
                      min_cosine=args.min_cosine)
    _emit(report, args.json, args.report, args.html)
    if report.fidelity and report.fidelity.get("passed") is False:
        print(f"onnxcomp: target missed (--min-cosine {args.min_cosine})", file=sys.stderr)
        return EXIT_TARGET_MISSED
    return 0


def cmd_bench(args) -> int:
    from onnxcomp.measure.bench import bench
    from onnxcomp.report import progress

    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    _check_outputs((args.report, "--report"), (args.html, "--html"))
    if any(_is_parts(m) for m in args.models):
        if args.runtime.strip().lower() not in ("onnxruntime", "ort"):
            raise UserError("pipeline bench runs in ONNX Runtime only (--runtime onnxruntime)")
        from onnxcomp import cli_parts

        return cli_parts.bench(args, _emit)
    # An .ort file (ONNX Runtime Mobile) is not ONNX: it reads only itself.
    onnx_models = [m for m in args.models if not m.lower().endswith(".ort")]
    _check_not_inputs(onnx_models, [args.report, args.html])
    if len(onnx_models) < len(args.models):
        from onnxcomp.model import check_output_paths

        check_output_paths([args.report, args.html],
                           [m for m in args.models if m not in onnx_models])
    report = bench(args.models, providers=providers, threads=_int_list(args.threads, "--threads"),
                   batch=args.batch, runs=args.runs, warmup=args.warmup, data=args.data,
                   memory=not args.no_memory, min_seconds=args.min_seconds,
                   spinning=not args.no_spinning, progress=None if args.json else progress,
                   runtimes=args.runtime, shapes=_shapes(args.shape))
    _emit(report, args.json, args.report, args.html)
    return 0


def cmd_report(args) -> int:
    from onnxcomp.report_html import render_html

    _check_outputs((args.html, "--html"))
    try:
        data = json.loads(Path(args.report).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{args.report}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{args.report}: cannot read it: {exc}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{args.report}: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{args.report}: not an onnxcomp report (a JSON "
                        f"{type(data).__name__}, expected an object)")
    try:
        path = render_html(data, args.html)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        raise UserError(f"{args.report}: not an onnxcomp report this version can draw "
                        f"({type(exc).__name__}: {_one_line(exc)})") from None
    print(path)
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


def cmd_search(args) -> int:
    from onnxcomp.search import search

    result = search(args.model, calib=args.calib, eval_data=args.eval,
                    constraints=args.constraint or [], objectives=args.objective,
                    n_trials=args.trials, out_dir=args.out, space=args.space,
                    executor=args.executor, ray_address=args.ray_address,
                    workers=args.workers, seed=args.seed, sampler=args.sampler,
                    threads=args.threads, provider=args.provider,
                    keep_models=args.keep_models, enqueue=args.enqueue or [],
                    html=args.html)
    print(result.table())
    print(f"HTML: {args.html or Path(args.out) / 'pareto.html'}")
    if result.best is None:
        print("onnxcomp: no trial met every constraint", file=sys.stderr)
        return EXIT_TARGET_MISSED
    return 0


def cmd_demo(args) -> int:
    from onnxcomp.demo import run_demo

    _check_writable(str(Path(args.out) / "report.json"), "--out")
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
    parser.add_argument("--quiet", "-q", action="store_true", default=False,
                        help="no progress on stderr (results and errors still print)")
    sub = parser.add_subparsers(dest="command", required=True)
    # --quiet after the command works too; SUPPRESS keeps a subcommand from resetting the
    # top-level value when the flag is not repeated there.
    common = _Parser(add_help=False)
    common.add_argument("--quiet", "-q", action="store_true", default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS)

    def command(name: str, what: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=what, parents=[common])

    demo = command("demo", "compress, validate and time the default zoo model")
    demo.add_argument("--out", default="onnxcomp-demo", help="folder for the demo's outputs")
    demo.add_argument("--recipe", default=None, help="recipe to demo (default: the demo's own)")
    demo.add_argument("--json", action="store_true")
    demo.set_defaults(func=cmd_demo)

    inspect = command("inspect", "ops, parameters, FLOPs, what each pass would do")
    inspect.add_argument("model")
    inspect.add_argument("--shape", action="append", metavar="NAME=D,D,D",
                         help="concrete input shape for FLOPs (repeatable)")
    inspect.add_argument("--json", action="store_true")
    inspect.set_defaults(func=cmd_inspect)

    compress = command("compress", "run a compression recipe")
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
    compress.add_argument("--html", default=None, metavar="FILE",
                          help="write the report as one self-contained HTML page here")
    compress.add_argument("--min-cosine", type=float, default=None,
                          help="exit 1 (and write no model) if any output's cosine is lower")
    compress.add_argument("--set", action="append", metavar="PASS.FIELD=VALUE",
                          help="override one option of a recipe step, e.g. "
                          "quantize.calibration=minmax or prune.heads=0.25 (repeatable)")
    compress.add_argument("--no-validate", action="store_true",
                          help="skip the fidelity check (run `onnxcomp validate` later; keeps "
                          "the reference model out of memory for very large models)")
    compress.add_argument("--no-speed-check", action="store_true",
                          help="skip the short timing of input and result that warns when a "
                               "recipe meant to be faster (int8, prune, lowrank) is slower")
    compress.add_argument("--dry-run", action="store_true", help="print the plan, change nothing")
    compress.add_argument("--part", action="append", metavar="PART=RECIPE",
                          help="pipeline folders: this part's (or the decoder group's) recipe, "
                               "or PART=float (repeatable)")
    compress.add_argument("--target", default=None,
                          help="deployment target: ort-cpu (default), openvino, tensorrt, qnn, "
                          "ort-mobile (wins over a TOML recipe's target key); its quantize "
                          "defaults apply before --set")
    compress.add_argument("--shape", action="append", metavar="NAME=D,D,D",
                          help="fix an input's dynamic dims in the result (static-shape "
                               "runtimes: ORT Mobile's NNAPI/CoreML, QNN; repeatable)")
    compress.add_argument("--json", action="store_true")
    compress.set_defaults(func=cmd_compress)

    validate = command("validate", "fidelity of a candidate against its reference")
    validate.add_argument("reference")
    validate.add_argument("candidate")
    validate.add_argument("--data", default=None)
    validate.add_argument("--count", type=int, default=None)
    validate.add_argument("--min-cosine", type=float, default=None)
    validate.add_argument("--new-tokens", type=int, default=None,
                          help="pipelines: tokens to generate (default: the manifest's)")
    validate.add_argument("--report", default=None, help="write the JSON report here")
    validate.add_argument("--html", default=None, metavar="FILE",
                          help="write the report as one self-contained HTML page here")
    validate.add_argument("--json", action="store_true")
    validate.set_defaults(func=cmd_validate)

    bench = command("bench", "latency, throughput, memory and size")
    bench.add_argument("models", nargs="+")
    bench.add_argument("--providers", default="cpu",
                       help="ONNX Runtime execution providers, e.g. cpu,cuda,tensorrt,openvino")
    bench.add_argument("--runtime", default="onnxruntime",
                       help="onnxruntime, openvino (OpenVINO's own API; openvino:f32 or "
                       "openvino:bf16 sets its precision) or both, comma-separated: timed "
                       "interleaved side by side")
    bench.add_argument("--shape", action="append", metavar="NAME=D,D,D",
                       help="shape of an input's random data (dynamic dims; repeatable)")
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
    bench.add_argument("--new-tokens", type=int, default=None,
                       help="pipelines: tokens generated per timed run (default 16)")
    bench.add_argument("--context", type=int, default=None,
                       help="pipelines: prompt length the per-token latency is measured at")
    bench.add_argument("--report", default=None, help="write the JSON report here")
    bench.add_argument("--html", default=None, metavar="FILE",
                       help="write the report as one self-contained HTML page here")
    bench.add_argument("--json", action="store_true")
    bench.set_defaults(func=cmd_bench)

    search = command("search", "find the best recipe for a constraint (optuna; ray optional)")
    search.add_argument("model")
    search.add_argument("--calib", default=None, help="calibration data (as for compress)")
    search.add_argument("--eval", default=None, help="held-out data the constraints are "
                        "checked on (default: the zoo's eval split for zoo data)")
    search.add_argument("--constraint", action="append", metavar="METRIC>=BOUND",
                        help="e.g. 'cosine>=0.99', 'line_accuracy>=float-0.01' (repeatable)")
    search.add_argument("--objective", default="latency",
                        help="latency, size, params; comma-separated for several")
    search.add_argument("--trials", type=int, default=20)
    search.add_argument("--space", default=None, help="TOML narrowing/extending the space")
    search.add_argument("--executor", choices=["local", "ray"], default=None,
                        help="default: ray where installed, else a local process pool")
    search.add_argument("--ray-address", default=None, help="a Ray cluster's address")
    search.add_argument("--workers", type=int, default=None, help="trials at once")
    search.add_argument("--threads", type=int, default=1, help="cores per timing trial")
    search.add_argument("--provider", default="cpu", help="execution provider")
    search.add_argument("--sampler", choices=["tpe", "nsga2"], default="tpe")
    search.add_argument("--seed", type=int, default=0)
    search.add_argument("--keep-models", action="store_true",
                        help="keep every trial's model, not only the Pareto front's")
    search.add_argument("--enqueue", action="append", metavar="RECIPE",
                        help="a fixed recipe (quantize:int8) to run first, measured side by "
                        "side with what the search finds (repeatable)")
    search.add_argument("--html", default=None, metavar="FILE",
                        help="also write the HTML page here (always: OUT/pareto.html)")
    search.add_argument("-o", "--out", default="onnxcomp-search", help="output folder")
    search.set_defaults(func=cmd_search)

    report = command("report", "render a JSON report as one HTML page")
    report.add_argument("report", metavar="REPORT.json")
    report.add_argument("--html", required=True, metavar="FILE",
                        help="the self-contained HTML page to write")
    report.set_defaults(func=cmd_report)

    export = command("export", "PyTorch / Hugging Face model → ONNX")
    export.add_argument("source")
    export.add_argument("-o", "--output", required=True)
    export.add_argument("--opset", type=int, default=17)
    export.add_argument("--tolerance", type=float, default=1e-4,
                        help="max abs error against PyTorch before exit 1")
    export.add_argument("--json", default=None, help="write the export check as JSON here")
    export.set_defaults(func=cmd_export)

    zoo = command("zoo", "the model zoo")
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
        from onnxcomp import progress
        from onnxcomp.model import terminate_cleanly

        progress.configure(quiet=args.quiet)
        with terminate_cleanly():  # SIGTERM/SIGHUP clean up partial writes like Ctrl-C
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
    except BrokenPipeError:  # `onnxcomp ... | head`: the reader left; not an error of ours
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (flushed at exit, then closed)
        return 141
    except Exception as exc:  # a bug, not the user's fault: one line unless debugging
        if os.environ.get("ONNXCOMP_DEBUG"):
            raise
        print(f"onnxcomp: internal error: {type(exc).__name__}: {_one_line(exc)} "
              f"{_PLEASE_REPORT}", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
