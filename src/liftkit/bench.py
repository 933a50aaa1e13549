"""``liftkit bench``: several methods on the same data, model, initial weights and seed, one after the other.

Each run is a separate ``liftkit train`` process, so its peak RSS and timing are its own. The bench writes
``results.json`` (``{"machine": {...}, "runs": [summary, ...]}``), ``results.md`` (a table) and PNG plots of
test accuracy and training loss against epochs and seconds.

A run is named by a label: ``adam`` runs the ``adam`` method; ``proxprop@sgd`` runs ``proxprop`` under the
label ``proxprop@sgd``, so one bench can hold the same method with different settings. Per-run settings are
``LABEL.KEY=VALUE``: hyperparameters of the method, or one of the run keys ``loss``, ``epochs``,
``batch_size``, ``activation``, ``sampling``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from liftkit.errors import LiftkitError
from liftkit.io import atomic_write_json, atomic_write_text
from liftkit.methods import get
from liftkit.profiling import PROFILE_NOTE, render_profile
from liftkit.train import RunSettings

__all__ = [
    "RUN_KEYS",
    "BenchSpec",
    "machine_info",
    "render_profiles",
    "render_table",
    "run_bench",
    "run_settings",
    "time_to_target",
]

RUN_KEYS = ("loss", "epochs", "batch_size", "activation", "sampling", "preset")


@dataclass(kw_only=True)
class BenchSpec(RunSettings):
    """Settings of one benchmark (the options of ``liftkit bench``): the run settings every run shares, the
    runs, and their per-run settings. With ``log_dir`` each run logs into ``LOG_DIR/LABEL`` (default: its own
    run directory)."""

    methods: list[str]
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)  # label -> {key: value}
    out: str = "bench-out"
    target_accuracy: float | None = None
    command: str | None = None  # the command line, kept in results.json's record for `liftkit report`
    #: timed repetitions of every run (each from scratch, in a rotated order); seconds per epoch is their median
    repeat: int = 1


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str = "cpu") -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def time_to_target(summary: dict[str, Any], target: float) -> float | None:
    """Cumulative training seconds at the first epoch whose test accuracy reaches ``target``."""
    for h in summary.get("history", []):
        acc = h.get("test_accuracy")
        if acc is not None and acc >= target:
            return float(h["seconds"])
    return None


def _split_label(label: str) -> str:
    return label.split("@", 1)[0]


def _validate(spec: BenchSpec) -> None:
    if not spec.methods:
        raise LiftkitError("bench needs at least one method: --methods adam,sgd,...")
    if len(set(spec.methods)) != len(spec.methods):
        raise LiftkitError("a method label appears twice in --methods; use name@label to run a method twice")
    for label in spec.methods:
        get(_split_label(label))  # unknown method -> ValueError listing the valid names
    if isinstance(spec.repeat, bool) or not isinstance(spec.repeat, int) or spec.repeat < 1:
        raise LiftkitError(f"repeat must be an integer >= 1, got {spec.repeat!r}")
    for label in spec.settings:
        if label not in spec.methods:
            raise LiftkitError(
                f"--set names run {label!r}, which is not in --methods ({', '.join(spec.methods)})"
            )


def _train_command(spec: BenchSpec, label: str, out_dir: Path) -> list[str]:
    settings = dict(spec.settings.get(label, {}))
    run_opts = {k: settings.pop(k) for k in RUN_KEYS if k in settings}
    cmd = [
        sys.executable,
        "-m",
        "liftkit",
        "train",
        "--method",
        _split_label(label),
        "--label",
        label,
        "--dataset",
        spec.dataset,
        "--model",
        spec.model,
        "--activation",
        str(run_opts.get("activation", spec.activation)),
        "--epochs",
        str(run_opts.get("epochs", spec.epochs)),
        "--seed",
        str(spec.seed),
        "--out",
        str(out_dir),
        "--device",
        spec.device,
        "--dtype",
        spec.dtype,
        "--split",
        spec.split,
        "--sampling",
        str(run_opts.get("sampling", spec.sampling)),
    ]
    batch = run_opts.get("batch_size", spec.batch_size)
    if batch is not None:
        cmd += ["--batch-size", str(batch)]
    loss = run_opts.get("loss", spec.loss)
    if loss is not None:
        cmd += ["--loss", str(loss)]
    preset = run_opts.get("preset", spec.preset)
    if preset is not None:
        cmd += ["--preset", str(preset)]
    if spec.data_dir is not None:
        cmd += ["--data-dir", spec.data_dir]
    if spec.mean_subtract:
        cmd.append("--mean-subtract")
    if spec.threads is not None:
        cmd += ["--threads", str(spec.threads)]
    if spec.checkpoint_every != 1:
        cmd += ["--checkpoint-every", str(spec.checkpoint_every)]
    if spec.profile:
        cmd.append("--profile")
    for key, value in settings.items():
        text = ",".join(str(v) for v in value) if isinstance(value, list | tuple) else str(value)
        cmd += ["--set", f"{key}={text}"]
    return cmd + _log_args(spec, label)


def _log_args(spec: BenchSpec, label: str) -> list[str]:
    args: list[str] = []
    if spec.log:
        args += ["--log", ",".join(spec.log)]
        if spec.log_dir is not None:
            args += ["--log-dir", str(Path(spec.log_dir) / label.replace("/", "_"))]
        if spec.log_every is not None:
            args += ["--log-every", str(spec.log_every)]
    if spec.deterministic:
        args.append("--deterministic")
    return args


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _num(x: float | None, fmt: str = ".4f") -> str:
    return "-" if x is None else format(x, fmt)


def run_settings(summary: dict[str, Any]) -> str:
    """What a run set beyond its method's defaults: the preset, then the explicit hyperparameters."""
    parts = [f"preset {summary.get('preset', 'tuned')}"]
    for key, value in (summary.get("hparams_set") or {}).items():
        text = ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
        parts.append(f"{key}={text}")
    return ", ".join(parts)


def render_table(results: dict[str, Any], target: float | None = None) -> str:
    """The markdown table of ``results.md``."""
    machine = results["machine"]
    lines = [
        f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, device {machine['device']}",
        "",
    ]
    split = next((r.get("split") for r in results["runs"] if r.get("split")), "test")
    acc = "validation acc" if split == "validation" else "test acc"
    head = ["run", "method", "settings", f"final {acc} %", f"best {acc} %", "final train loss", "s/epoch"]
    if target is not None:
        head.append(f"s to {100 * target:g}%")
    head.append("peak RSS MB")
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for r in results["runs"]:
        if "error" in r:
            row = [r["label"], r.get("method", ""), "", "failed: " + r["error"]] + [""] * (len(head) - 4)
        else:
            row = [
                r["label"],
                r.get("reporting_name", r["method"]),
                run_settings(r),
                _pct(r["test_accuracy"]),
                _pct(r["best_test_accuracy"]),
                _num(r["train_loss"]),
                _num(r["seconds_per_epoch"], ".2f"),
            ]
            if target is not None:
                row.append(_num(time_to_target(r, target), ".1f"))
            row.append(_num(r["peak_rss_mb"], ".0f"))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n" + render_profiles(results)


def render_profiles(results: dict[str, Any]) -> str:
    """One profile table per profiled run (``bench --profile``), after the results table."""
    profiled = [r for r in results["runs"] if r.get("profile")]
    if not profiled:
        return ""
    parts = ["", "### Profiles", "", PROFILE_NOTE, ""]
    parts += [render_profile(r["profile"], r["label"]) for r in profiled]
    return "\n".join(parts)


def _plot(results: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results["runs"] if "error" not in r and r.get("history")]
    written: list[Path] = []
    panels = [("train_loss", "training loss", "loss.png")]
    if any(h.get("test_accuracy") is not None for r in runs for h in r["history"]):
        panels.insert(0, ("test_accuracy", "test accuracy", "accuracy.png"))
    for key, title, name in panels:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for i, r in enumerate(runs):
            epochs = [h["epoch"] for h in r["history"]]
            secs = [h["seconds"] for h in r["history"]]
            vals = [h[key] for h in r["history"]]
            # The colour cycle has 10 entries; later runs switch line style so no two runs look alike.
            style = {"marker": ".", "label": r["label"], "linestyle": ("-", "--", ":")[(i // 10) % 3]}
            axes[0].plot(epochs, vals, **style)
            axes[1].plot(secs, vals, **style)
        axes[0].set_xlabel("epoch")
        axes[1].set_xlabel("training seconds")
        for ax in axes:
            ax.set_ylabel(title)
            ax.grid(alpha=0.3)
            if key == "train_loss":
                ax.set_yscale("log")
        axes[1].legend(fontsize=8)
        fig.suptitle(f"{title}: {results['runs'][0].get('dataset', '')} {results['runs'][0].get('model', '')}")
        fig.tight_layout()
        path = out / name
        tmp = out / f".{name}.tmp.png"
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
        plt.close(fig)
        written.append(path)
    return written


def _run_one(spec: BenchSpec, label: str, out: Path, rep: int, echo: bool) -> dict[str, Any]:
    """One training run of ``label`` (repetition ``rep``, from 0) in its own process: its summary, or an error
    record."""
    name = label.replace("/", "_") + (f".rep{rep + 1}" if rep else "")
    run_dir = out / "runs" / name
    cmd = _train_command(spec, label, run_dir)
    if echo:
        print(f"[bench] {label}: {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, check=False)
    summary_path = run_dir / "summary.json"
    if proc.returncode == 0 and summary_path.exists():
        with open(summary_path, encoding="utf-8") as fh:
            summary: dict[str, Any] = json.load(fh)
        return summary
    failed = run_dir / "failed.json"
    message = f"exit code {proc.returncode}"
    if failed.exists():
        with open(failed, encoding="utf-8") as fh:
            message = json.load(fh).get("error", message)
    if proc.returncode == 2 and rep == 0 and label == spec.methods[0]:
        # An input error (bad dataset, model or hyperparameter) would fail every run alike.
        raise LiftkitError(message)
    return {"label": label, "method": _split_label(label), "error": message}


def _merge_repeats(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The first repetition's summary with the median seconds over the repetitions that finished."""
    first = runs[0]
    done = [r for r in runs if "error" not in r and r.get("seconds_per_epoch") is not None]
    if "error" in first or len(runs) == 1:
        return first
    merged = dict(first)
    per_epoch = [float(r["seconds_per_epoch"]) for r in done]
    merged["seconds_per_epoch_repeats"] = per_epoch
    merged["seconds_per_epoch"] = statistics.median(per_epoch)
    merged["train_seconds"] = statistics.median(float(r["train_seconds"]) for r in done)
    accuracies = [r.get("test_accuracy") for r in done]
    if any(a != accuracies[0] for a in accuracies):
        merged["repeat_accuracy_mismatch"] = accuracies
    return merged


def run_bench(spec: BenchSpec, *, echo: bool = True) -> dict[str, Any]:
    """Run every method of ``spec`` in turn and write the results; returns ``results.json``'s content.

    With ``spec.repeat = n > 1`` the whole set runs n times, each repetition from scratch into its own run
    directory (``runs/LABEL``, then ``runs/LABEL.rep2``, ...) and in an order rotated by one, so that no method
    always runs first; every run reports its first repetition's results with ``seconds_per_epoch`` (and
    ``train_seconds``) replaced by the median over the repetitions, which are listed in
    ``seconds_per_epoch_repeats``. A repetition whose final test accuracy differs from the first is reported in
    ``repeat_accuracy_mismatch`` (training is deterministic on the CPU, so it should not).
    """
    _validate(spec)
    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": machine_info(spec.device), "runs": []}
    results["record"] = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d")}
    if spec.command:
        results["record"]["command"] = spec.command
    if spec.threads is not None:
        results["machine"]["torch_threads"] = spec.threads
    if spec.repeat > 1:
        results["machine"]["repeat"] = spec.repeat
    repeats: dict[str, list[dict[str, Any]]] = {}
    for rep in range(spec.repeat):
        shift = rep % len(spec.methods)
        for label in spec.methods[shift:] + spec.methods[:shift]:
            if rep > 0 and "error" in repeats[label][0]:
                continue
            repeats.setdefault(label, []).append(_run_one(spec, label, out, rep, echo))
            results["runs"] = [_merge_repeats(repeats[lb]) for lb in spec.methods if lb in repeats]
            atomic_write_json(out / "results.json", results)
    table = render_table(results, spec.target_accuracy)
    atomic_write_text(out / "results.md", table)
    plots = _plot(results, out)
    results["plots"] = [str(p) for p in plots]
    return results
