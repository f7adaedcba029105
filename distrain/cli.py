"""The ``distrain`` command. Parses, validates, then calls the library; TensorFlow is imported
only by the commands that need it, after every input has been checked."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from distrain import __version__, malloc, startup, user_code
from distrain.backends.factory import choose_strategy
from distrain.bench import add_parser as add_bench_parser
from distrain.data.cli import add_parser as add_data_parser
from distrain.data.cli import log_to_stderr
from distrain.doctor import add_parser as add_doctor_parser
from distrain.errors import EXIT_FAILED, EXIT_USAGE, TrainingStopped, UsageError
from distrain.launch import register_parsers
from distrain.models import MODELS, REGISTRY_CLASSES, describe, is_user_model
from distrain.report import add_report_parser
from distrain.run import train
from distrain.rundir import RunDir
from distrain.spec import dump_spec
from distrain.sweeps.local import add_parser as add_sweep_parser
from distrain.sweeps.local import add_sweep_args
from distrain.sweeps.plan import plan as plan_sweep
from distrain.tf_startup import VERBOSE_ENV, import_tensorflow
from distrain.world import detect

EPILOG = """\
examples:
  distrain train jobs/quickstart.yaml                    train on this machine
  distrain train jobs/cnn.yaml --set train.epochs=3      override a key of the job
  distrain train --resume runs/cnn/20261127-101500       continue a stopped run
  distrain validate jobs/mobilenet.yaml                  check a job without starting anything
  distrain sweep jobs/quickstart.yaml --run-dir runs/lr --grid train.learning_rate=0.001,0.003
                                                         train a sweep's trials, then: distrain report runs/lr
  distrain env --json                                    what a launcher gave this process
exit codes: 0 done, 1 failed, 2 bad input, 74 a write failed (disk full), 75 preempted (rerun to resume),
  76 peer lost, 77 NaN loss
"""


def _add_job_args(p: argparse.ArgumentParser, job_required: bool = True) -> None:
    p.add_argument("job", nargs=None if job_required else "?", help="the job's YAML file (see jobs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a key of the job, e.g. --set train.epochs=3 (repeatable)")


def build_parser() -> argparse.ArgumentParser:

    parser = argparse.ArgumentParser(prog="distrain", description="Train the Keras course models data-parallel, "
                                     "on one machine or a cluster.", epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"distrain {__version__}")
    parser.add_argument("--verbose", action="store_true",
                        help="show TensorFlow's start-up and C++ log lines (hidden by default; also DISTRAIN_TF_LOG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a job", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train a job. Under a launcher (srun, TF_CONFIG, horovodrun, Ray) every "
                                   "process runs this same command.")
    _add_job_args(p, job_required=False)
    p.add_argument("--run-dir", type=Path, help="where the run writes (default: OUTPUT_DIR/NAME/RUN_ID)")
    p.add_argument("--run-id", help="the run's id (default: $DISTRAIN_RUN_ID, slurm-$SLURM_JOB_ID, or the time)")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its backup (the job defaults to RUN_DIR/job.yaml)")

    p = sub.add_parser("validate", help="check a job as training would (data, labels, model) and print it resolved",
                       description="Check a job without training: the job file, your code, then the data and "
                                   "the model as `train` checks them before its first step (the data loaded or "
                                   "listed, its labels checked, the model built).")
    _add_job_args(p)
    add_sweep_args(p)
    p.add_argument("--quiet", action="store_true", help="print nothing when the job is valid")

    p = sub.add_parser("models", help="list the models: name, input shape, parameter count")
    p.add_argument("--json", action="store_true")
    p.add_argument("--describe", metavar="MODEL", help="one model, a course model or your own "
                   "(package.module:function or path/to/file.py:function): its parameters and size")
    p.add_argument("--input-shape", metavar="H,W,C", help="with --describe: build it for this input shape")
    p.add_argument("--classes", type=int, default=10, help="with --describe: build it for this many classes")

    p = sub.add_parser("env", help="print what the launcher gave this process and the strategy auto picks")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--port", type=int, help="base worker port (default: from the job id)")

    add_sweep_parser(sub)
    add_report_parser(sub)
    add_data_parser(sub)
    add_bench_parser(sub)
    add_doctor_parser(sub)
    _add_launcher_parsers(sub)
    return parser


def _add_launcher_parsers(sub) -> None:
    """Launchers register their own sub-commands; a missing optional one just isn't listed."""

    register_parsers(sub)


def cmd_train(args) -> int:

    job = args.job
    if args.resume:
        if not args.resume.is_dir():
            raise UsageError(f"--resume: no such run dir: {args.resume}")
        job = job or RunDir(args.resume).job
        if args.run_dir and args.run_dir != args.resume:
            raise UsageError("--run-dir: give --resume RUN_DIR or --run-dir, not two different dirs")
    if job is None:
        raise UsageError("train: give a job file (e.g. jobs/quickstart.yaml) or --resume RUN_DIR")
    begun = startup.start(job, args.overrides, run_dir=args.resume or args.run_dir, run_id=args.run_id)

    summary = train(begun.spec, begun.run_dir, world=begun.world)
    if begun.world.is_chief:
        test = summary["test"]
        print(f"test accuracy: {test.get('accuracy', float('nan')):.4f}  loss: {test.get('loss', float('nan')):.4f}"
              f"  ({summary['steps']} steps, {summary['world_size']} worker(s), {summary['replicas']} replica(s))"
              f"\nrun dir: {summary['run_dir']}")
    return 0


def cmd_validate(args) -> int:

    spec = startup.check(args.job, args.overrides)
    # A sweep's trials are each checked as --set checks them, before the data and the model.
    sweep = (plan_sweep(args.job, args.overrides, grid=args.grid, trials=args.trials)
             if spec.sweep.defined or args.grid or args.trials is not None else None)
    with log_to_stderr(logging.WARNING if args.quiet else logging.INFO):
        found = startup.preflight(spec)
    if not args.quiet:
        print(dump_spec(sweep.spec if sweep else spec), end="")
        if sweep:
            print("".join(f"# {line}\n" for line in sweep.describe()), end="")
        print(f"# {args.job}: valid: {found.describe()}", file=sys.stderr)
    return 0


def cmd_models(args) -> int:
    if args.describe:
        return _describe_model(args)

    # Parameter counts come from the registry (checked against the built models by
    # tests/test_models.py), so listing the models needs no TensorFlow.
    rows = [{"name": name, "input_shape": list(entry.default_input_shape), "classes": REGISTRY_CLASSES,
             "params": entry.params, "description": entry.description} for name, entry in MODELS.items()]
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"{'name':<14}{'input shape':<14}{'params':>12}  description")
        for r in rows:
            shape = "x".join(map(str, r["input_shape"]))
            print(f"{r['name']:<14}{shape:<14}{r['params']:>12,}  {r['description']}")
    return 0


def _describe_model(args) -> int:

    if not is_user_model(args.describe) and args.describe not in MODELS:
        raise UsageError(f"--describe: expected one of {', '.join(MODELS)} or package.module:function or "
                         f"path/to/file.py:function, got {args.describe!r}")
    shape = None
    if args.input_shape:
        try:
            shape = tuple(int(v) for v in args.input_shape.split(","))
        except ValueError:
            shape = ()
        if len(shape) not in (2, 3) or min(shape) < 1:
            raise UsageError(f"--input-shape: expected H,W or H,W,C of positive integers, got {args.input_shape!r}")
        shape = shape if len(shape) == 3 else (*shape, 1)
    if args.classes < 2:
        raise UsageError(f"--classes: expected an integer >= 2, got {args.classes}")
    name = args.describe

    import_tensorflow()  # before the user's module imports it, so that its start-up notices stay quiet
    if is_user_model(name):  # relative files are relative to here, as on the command line

        name = user_code.absolute(name, Path.cwd())
    info = describe(name, shape, args.classes)
    if args.json:
        print(json.dumps(info, indent=1, default=str))
        return 0
    print(f"{info['name']}: {info.get('description') or info.get('defined_at')}")
    print(f"  input shape {'x'.join(map(str, info['input_shape']))}, {info['classes']} classes: "
          f"{info['params']:,} parameters")
    params = info["parameters"]
    print("  model.params: " + (", ".join(f"{k}={v!r}" for k, v in params.items()) if params else "none"))
    return 0


def cmd_env(args) -> int:

    world = detect(port_override=args.port)

    tf = import_tensorflow()

    gpus = tf.config.list_physical_devices("GPU")
    try:
        strategy = choose_strategy("auto", world, len(gpus))
    except UsageError as err:
        strategy = f"none ({err})"
    info = {**world.as_dict(), "devices": [d.name for d in tf.config.list_physical_devices()],
            "strategy": strategy}
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        for key, value in info.items():
            print(f"{key:>18}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    return 0


COMMANDS = {"train": cmd_train, "validate": cmd_validate, "models": cmd_models, "env": cmd_env}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``distrain`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verbose:

        # Before TensorFlow loads (it reads both at start-up); workers a launcher starts inherit them.
        os.environ[VERBOSE_ENV] = "1"
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
    handler = getattr(args, "handler", None) or COMMANDS[args.command]
    try:

        malloc.wanted()  # a bad DISTRAIN_MALLOC is an exit 2 here, not after a rendezvous
        return handler(args)
    except UsageError as err:
        print(f"distrain: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except TrainingStopped as err:
        print(f"distrain: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("distrain: interrupted", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
