"""The ``liftkit`` command: ``train``, ``bench``, ``report``, ``datasets``, ``methods``.

Exit codes: 0 success; 2 usage or input error (one line on stderr, no traceback); 1 failure during training
(e.g. divergence). Set ``LIFTKIT_DEBUG=1`` to see tracebacks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from liftkit.errors import DivergenceError, LiftkitError, PeerLostError

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, as promised for every usage error.
        self.exit(2, f"liftkit: error: {message} (see 'liftkit {self.prog.split()[-1]} --help')\n")


def _parse_sets(items: Sequence[str] | None) -> list[tuple[str, str]]:
    pairs = []
    for item in items or []:
        if "=" not in item:
            raise LiftkitError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip()
        if not key:
            raise LiftkitError(f"--set expects KEY=VALUE, got {item!r}")
        pairs.append((key, value.strip()))
    return pairs


def _common(p: argparse.ArgumentParser, *, bench: bool) -> None:
    p.add_argument("--dataset", help="digits, mnist, fashion-mnist or cifar10")
    p.add_argument("--model", help="784-500-10, lenet5, resnet8, proxprop-convnet or ae:784-1000-500-250-30")
    p.add_argument("--activation", help="hidden activation of mlp/autoencoder models (default relu)")
    p.add_argument("--epochs", type=int, help="number of epochs (default 5)")
    p.add_argument("--batch-size", type=int, help="mini-batch size; 0 = full batch (default: the method's)")
    p.add_argument("--loss", choices=["ce", "mse"], help="loss (default: the method's)")
    p.add_argument("--preset", help="the methods' named setting: tuned (default) or paper; see 'liftkit methods'")
    p.add_argument("--seed", type=int, help="seed for initial weights and batch order (default 0)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="method hyperparameter" + (" as METHOD.KEY=VALUE" if bench else "") + "; repeatable",
    )
    p.add_argument("--data-dir", help="dataset directory (default: $LIFTKIT_DATA_DIR, else a user cache dir)")
    p.add_argument("--out", help="output directory")
    p.add_argument("--device", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", choices=["float32", "float64"], help="default float32")
    p.add_argument("--split", choices=["test", "validation"], help="evaluate on the test set or on the last "
                   "10%% of the training set (for tuning); default test")
    p.add_argument("--sampling", choices=["shuffle", "replacement"], help="batch sampling (default shuffle)")
    p.add_argument("--mean-subtract", action="store_true", default=None, help="subtract per-channel pixel means")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--checkpoint-every", type=int, help="write the checkpoint every N epochs (default 1)")
    p.add_argument("--profile", action="store_true", default=None, help="time the method's named blocks and "
                   "count their matrix-product FLOPs; writes profile.json" + (" per run and a table per run in "
                   "results.md" if bench else " in --out"))
    _log_options(p)


def _log_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log", metavar="LOGGERS", help="comma-separated loggers: csv, tensorboard (needs "
                   "pip install 'liftkit[tensorboard]')")
    p.add_argument("--log-dir", help="where the loggers write (default: the run's --out directory)")
    p.add_argument("--log-every", type=int, metavar="N", help="also log every N-th step (default: epochs only)")
    p.add_argument("--deterministic", action="store_true", default=None,
                   help="deterministic algorithms and seeded generators: repeat runs bit for bit (see the docs)")


def _version() -> str:
    from liftkit import __version__

    return __version__


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="liftkit", description="Train neural networks with lifted and proximal methods.")
    parser.add_argument("--version", action="version", version=f"liftkit {_version()}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    train = sub.add_parser("train", help="train one method")
    train.add_argument("--method", required=True, help="registered method name (see 'liftkit methods')")
    _common(train, bench=False)
    train.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    train.add_argument(
        "--dist-timeout",
        type=float,
        help="under torchrun: seconds a collective may wait for the other processes before this one stops "
        "(default 300)",
    )
    train.add_argument("--label", help=argparse.SUPPRESS)
    progress = train.add_mutually_exclusive_group()
    progress.add_argument("--progress", dest="progress", action="store_true", default=None)
    progress.add_argument("--quiet", dest="progress", action="store_false")

    bench = sub.add_parser("bench", help="run several methods on the same data, model and seed")
    bench.add_argument("--methods", help="comma-separated method names (name@label to repeat a method)")
    bench.add_argument("--config", help="JSON file with bench settings, or the name of a shipped config such as "
                       "demo (CLI options override it)")
    bench.add_argument("--target-accuracy", type=float, help="report seconds to reach this test accuracy")
    bench.add_argument("--repeat", type=int, help="run the whole set N times (rotating the order) and report the "
                       "median seconds per epoch of each run (default 1)")
    _common(bench, bench=True)

    report = sub.add_parser("report", help="write the results record (DIR.md) from the bench outputs under DIR")
    report.add_argument("dir", help="folder holding bench outputs (results.json files), e.g. docs/results")
    report.add_argument("--out", help="markdown file to write (default: DIR.md beside DIR)")

    datasets = sub.add_parser("datasets", help="list datasets and whether their files are present and verified")
    datasets.add_argument("--data-dir")

    sub.add_parser("methods", help="list the registered methods")
    return parser


_DEFAULTS: dict[str, Any] = {
    "activation": "relu",
    "epochs": 5,
    "batch_size": None,
    "loss": None,
    "preset": None,
    "seed": 0,
    "data_dir": None,
    "device": "cpu",
    "dtype": "float32",
    "split": "test",
    "sampling": "shuffle",
    "mean_subtract": False,
    "threads": None,
    "checkpoint_every": 1,
    "profile": False,
    "log_dir": None,
    "log_every": None,
    "deterministic": False,
}


def _log_names(args: argparse.Namespace, config: dict[str, Any] | None = None) -> list[str]:
    """The validated --log names; --log-every and --log-dir without --log, or --log-every < 1, are errors."""
    from liftkit.loggers import check_log_every, parse_log_names

    config = config or {}
    raw = args.log if args.log is not None else config.get("log")
    names = parse_log_names(raw) if raw is not None else []
    for option in ("log_every", "log_dir"):
        if not names and (getattr(args, option) is not None or config.get(option) is not None):
            raise LiftkitError(f"--{option.replace('_', '-')} needs --log (csv, tensorboard)")
    check_log_every(args.log_every if args.log_every is not None else config.get("log_every"))
    if "tensorboard" in names:
        from liftkit.loggers import TensorBoardLogger

        TensorBoardLogger.check_available()
    return names


def _cmd_train(args: argparse.Namespace) -> int:
    from liftkit.methods import get
    from liftkit.train import RunSpec, run

    for name in ("dataset", "model"):
        if getattr(args, name) is None:
            raise LiftkitError(f"train needs --{name}")
    opts = {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in _DEFAULTS.items()}
    opts["log"] = _log_names(args)
    method_cls = get(args.method)
    hparams: dict[str, Any] = {}
    from liftkit.methods import parse_hparam

    for key, value in _parse_sets(args.set):
        hparams[key] = parse_hparam(method_cls.Config, key, value)
    out = args.out or os.path.join("runs", f"{args.method}-{args.dataset}")
    if args.dist_timeout is not None:
        opts["dist_timeout"] = args.dist_timeout
    spec = RunSpec(
        method=args.method,
        dataset=args.dataset,
        model=args.model,
        hparams=hparams,
        out=out,
        resume=args.resume,
        progress=args.progress,
        label=args.label,
        **opts,
    )
    # under torchrun only rank 0 touches the output directory
    main_rank = os.environ.get("RANK", "0") == "0"
    stale = Path(out) / "failed.json"
    if main_rank and stale.exists():
        stale.unlink()
    try:
        summary = run(spec)
    except (LiftkitError, ValueError) as exc:
        if main_rank:
            _record_failure(out, exc)
        raise
    if not main_rank:
        return 0
    acc = summary.get("test_accuracy")
    acc_text = "" if acc is None else f", test accuracy {100 * acc:.2f}%"
    print(
        f"{args.method} on {args.dataset}: train loss {summary['train_loss']:.4f}{acc_text}, "
        f"{summary['seconds_per_epoch']:.2f} s/epoch; results in {out}"
    )
    if "profile" in summary:
        from liftkit.profiling import render_profile

        print("\n" + render_profile(summary["profile"], args.label or args.method), end="")
    return 0


def _record_failure(out: str, exc: BaseException) -> None:
    from liftkit.io import atomic_write_json

    with contextlib.suppress(OSError):
        atomic_write_json(Path(out) / "failed.json", {"error": str(exc), "type": type(exc).__name__})


def shipped_configs() -> dict[str, Path]:
    """The configs shipped inside the package (``liftkit/configs/*.json``), by name without ``.json``."""
    from importlib.resources import files

    folder = Path(str(files("liftkit") / "configs"))
    return {p.stem: p for p in sorted(folder.glob("*.json"))} if folder.is_dir() else {}


def _resolve_config(name: str) -> str:
    """An existing file is itself; otherwise a bare name (``demo`` or ``demo.json``) is a shipped config."""
    if Path(name).is_file() or "/" in name or os.sep in name:
        return name
    shipped = shipped_configs()
    stem = name[: -len(".json")] if name.endswith(".json") else name
    if stem in shipped:
        return str(shipped[stem])
    raise LiftkitError(
        f"config {name!r} is neither a file nor a shipped config; shipped: {', '.join(shipped) or '(none)'}"
    )


def _load_config(path: str) -> dict[str, Any]:
    path = _resolve_config(path)
    try:
        with open(path, encoding="utf-8") as fh:
            config = json.load(fh)
    except FileNotFoundError:
        raise LiftkitError(f"config file {path} not found") from None
    except json.JSONDecodeError as exc:
        raise LiftkitError(f"config file {path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise LiftkitError(f"config file {path} must hold a JSON object")
    return config


def _cmd_bench(args: argparse.Namespace) -> int:
    from liftkit.bench import BenchSpec, render_table, run_bench

    config = _load_config(args.config) if args.config else {}
    known = {"methods", "set", "target_accuracy", "repeat", "out", "dataset", "model", "description", "log",
             *_DEFAULTS}
    unknown = sorted(set(config) - known)
    if unknown:
        raise LiftkitError(f"unknown key {unknown[0]!r} in {args.config}; valid keys: {', '.join(sorted(known))}")

    def pick(name: str, default: Any = None) -> Any:
        value = getattr(args, name, None)
        return value if value is not None else config.get(name, default)

    methods = pick("methods")
    if methods is None:
        raise LiftkitError("bench needs --methods (or a --config with \"methods\")")
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    for name in ("dataset", "model"):
        if pick(name) is None:
            raise LiftkitError(f"bench needs --{name}")
    settings: dict[str, dict[str, Any]] = {}
    # --methods may narrow a config's runs: the config's settings of the runs left out go with them
    config_runs = config.get("methods") or []
    config_runs = [m.strip() for m in config_runs.split(",")] if isinstance(config_runs, str) else list(config_runs)
    config_sets = [
        (k, v)
        for k, v in (config.get("set") or {}).items()
        if not ("." in k and k.rsplit(".", 1)[0] in config_runs and k.rsplit(".", 1)[0] not in methods)
    ]
    raw_sets = config_sets + _parse_sets(args.set)
    from liftkit.bench import RUN_KEYS
    from liftkit.methods import get, parse_hparam

    for key, value in raw_sets:
        if "." not in key:
            raise LiftkitError(f"bench settings are METHOD.KEY=VALUE, got {key!r}")
        label, hkey = key.rsplit(".", 1)
        if label not in methods:
            raise LiftkitError(f"--set names run {label!r}, which is not in --methods ({', '.join(methods)})")
        if hkey not in RUN_KEYS:
            text = ",".join(str(v) for v in value) if isinstance(value, list) else str(value)
            parse_hparam(get(label.split("@", 1)[0]).Config, hkey, text)
        settings.setdefault(label, {})[hkey] = value
    spec = BenchSpec(
        methods=methods,
        dataset=pick("dataset"),
        model=pick("model"),
        settings=settings,
        out=pick("out", "bench-out"),
        target_accuracy=pick("target_accuracy"),
        repeat=pick("repeat", 1),
        command=_command_line(args.argv),
        log=_log_names(args, config),
        **{k: pick(k, v) for k, v in _DEFAULTS.items()},
    )
    results = run_bench(spec)
    print(render_table(results, spec.target_accuracy), end="")
    print(f"\nresults: {Path(spec.out) / 'results.json'}, {Path(spec.out) / 'results.md'}")
    if results.get("plots"):
        print("plots: " + ", ".join(results["plots"]))
    return 0 if any("error" not in r for r in results["runs"]) else 1


def _command_line(argv: Sequence[str]) -> str:
    """The command as a user would retype it (``--out`` left out: a record names what ran, not where)."""
    words: list[str] = []
    skip = False
    for word in argv:
        if skip:
            skip = False
            continue
        if word == "--out":
            skip = True
            continue
        if not word.startswith("--out="):
            words.append(word)
    return "liftkit " + shlex.join(words)


def _cmd_report(args: argparse.Namespace) -> int:
    from liftkit.report import write_report

    path = write_report(args.dir, args.out)
    print(f"results record written to {path}")
    return 0


def _cmd_datasets(args: argparse.Namespace) -> int:
    from liftkit.data import dataset_status, resolve_data_dir

    print(f"data directory: {resolve_data_dir(args.data_dir)}")
    for entry in dataset_status(args.data_dir):
        state = "ready" if entry["ready"] else "not ready"
        print(f"{entry['name']}: {state}")
        for f in entry.get("files", []):
            print(f"  {f['file']}: {f['status']}")
    return 0


def _cmd_methods(_: argparse.Namespace) -> int:
    from liftkit.methods import available, get

    for name in available():
        cls = get(name)
        print(f"{name:12s} {cls.reporting_name or name} — {cls.paper}")
        print(f"{'':12s} presets: {', '.join(cls.presets)} (default {cls.presets[0]})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    args.argv = list(sys.argv[1:] if argv is None else argv)
    handlers = {
        "train": _cmd_train,
        "bench": _cmd_bench,
        "report": _cmd_report,
        "datasets": _cmd_datasets,
        "methods": _cmd_methods,
    }
    try:
        return handlers[args.command](args)
    except DivergenceError as exc:
        print(f"liftkit: {exc}", file=sys.stderr)
        return 1
    except PeerLostError as exc:
        print(f"liftkit: error: {exc}; the last checkpoint is kept", file=sys.stderr)
        return 1
    except (LiftkitError, ValueError) as exc:
        if os.environ.get("LIFTKIT_DEBUG"):
            traceback.print_exc()
        print(f"liftkit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("liftkit: interrupted; the last completed epoch's checkpoint is kept", file=sys.stderr)
        return 130
    except Exception as exc:  # an unexpected failure still gets one line; the traceback on request
        if os.environ.get("LIFTKIT_DEBUG"):
            traceback.print_exc()
        print(
            f"liftkit: failed: {type(exc).__name__}: {exc} (set LIFTKIT_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1
