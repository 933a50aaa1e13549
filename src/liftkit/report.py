"""``liftkit report DIR``: the results record (``DIR.md``) generated from the bench outputs under ``DIR``.

Every ``results.json`` below ``DIR`` (as written by ``liftkit bench``) contributes its runs. The record has one
table per method (the variants of a method, e.g. ``lpom-sync``, share their method's table); each row is one
run of a lifted or proximal method beside the backprop baselines of the same bench (same data, model, initial
weights, seed and machine), with the paper's figure where the bench's ``record.paper`` names one, and the
command, date and machine that produced it. Regenerate it after every change::

    liftkit report docs/results          # writes docs/results.md

The optional ``record`` object of a ``results.json`` (``liftkit bench`` fills ``command`` and ``date``):
``{"title": str, "command": str, "date": "YYYY-MM-DD", "paper": {LABEL: {"value": str, "source": str}},
"notes": str}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from liftkit.errors import LiftkitError
from liftkit.io import atomic_write_text

__all__ = ["BASELINES", "collect", "method_family", "render_report", "write_report"]

#: backprop baselines: shown beside the methods of their bench, never as a table of their own
BASELINES = ("sgd", "adam", "lbfgs")

# Variants share their method's table (the serial method's docs page describes them all).
_FAMILY = {"lpom-sync": "lpom", "lpom-async": "lpom", "am": "tiam"}
_TITLES = {
    "lpom": "LPOM",
    "proxprop": "ProxProp",
    "fenchel": "Fenchel lifted networks",
    "sibp": "SIBP",
    "tiam": "TIAM and AM",
}


def method_family(method: str) -> str:
    """The results table a method's runs go to."""
    return _FAMILY.get(method, method)


@dataclass
class Bench:
    """One bench output: its folder (relative to the report's root), its runs and its record."""

    folder: str
    runs: list[dict[str, Any]]
    machine: str
    record: dict[str, Any]


def _machine_text(machine: Any) -> str:
    if isinstance(machine, str):
        return machine
    if not isinstance(machine, dict):
        return "-"
    parts = [f"{machine.get('cpu', '?')}, {machine.get('cores', '?')} cores"]
    if machine.get("gpu"):
        parts.append(str(machine["gpu"]))
    parts.append(f"torch {machine.get('torch', '?')}")
    if machine.get("torch_threads") is not None:
        parts.append(f"{machine['torch_threads']} thread(s)")
    return ", ".join(parts)


def _load(path: Path, root: Path) -> Bench:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise LiftkitError(f"{path} is not valid JSON ({exc}); re-run its bench or remove the folder") from None
    if not isinstance(data, dict) or not isinstance(data.get("runs"), list):
        raise LiftkitError(f"{path} has no 'runs' list; it is not a liftkit bench output")
    record = data.get("record") or {}
    if not isinstance(record, dict):
        raise LiftkitError(f"{path}: 'record' must be a JSON object")
    folder = path.parent.relative_to(root).as_posix()
    return Bench(folder=folder, runs=data["runs"], machine=_machine_text(data.get("machine")), record=record)


def collect(root: str | Path) -> list[Bench]:
    """Every bench output below ``root``, in folder order."""
    base = Path(root)
    if not base.is_dir():
        raise LiftkitError(f"results directory {base} not found; give the folder that holds the bench outputs")
    return [_load(p, base) for p in sorted(base.rglob("results.json"))]


def _metric(run: dict[str, Any]) -> str:
    if "error" in run:
        return "failed"
    acc = run.get("test_accuracy")
    name = "val" if run.get("split") == "validation" else ""
    if acc is not None:
        return f"{100 * acc:.2f}%" + (f" ({name})" if name else "")
    loss = run.get("test_loss")
    return "-" if loss is None else f"loss {loss:.4g}" + (f" ({name})" if name else "")


def _speed(run: dict[str, Any], reference: dict[str, Any] | None) -> str:
    seconds = run.get("seconds_per_epoch")
    if seconds is None:
        return "-"
    text = f"{seconds:.2f} s/ep"
    if reference is not None and reference is not run and reference.get("seconds_per_epoch"):
        text += f" ({seconds / reference['seconds_per_epoch']:.2f}x)"
    return text


def _setting(run: dict[str, Any]) -> str:
    batch = run.get("batch_size")
    batch_text = "full batch" if batch == 0 else f"batch {batch}"
    parts = [str(run.get("dataset", "?")), str(run.get("model", "?")), batch_text, f"{run.get('epochs', '?')} ep"]
    text = ", ".join(parts)
    overrides = run.get("hparams_set") or {}
    label = str(run.get("label", run.get("method", "")))
    sets = ", ".join(f"{k}={v}" for k, v in sorted(overrides.items()))
    return f"`{label}`: {text}" + (f"; {sets}" if sets else "")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _rows(bench: Bench, family: str) -> list[list[str]]:
    baselines = [r for r in bench.runs if r.get("method") in BASELINES]
    # speed ratios are to the first Adam run of the bench, else its first baseline
    reference = next((r for r in baselines if r.get("method") == "adam" and "error" not in r), None)
    reference = reference or next((r for r in baselines if "error" not in r), None)
    base_text = "; ".join(f"{r.get('label')}: {_metric(r)}, {_speed(r, None)}" for r in baselines) or "-"
    paper = bench.record.get("paper") or {}
    rows = []
    for run in bench.runs:
        if run.get("method") in BASELINES or method_family(str(run.get("method"))) != family:
            continue
        claim = paper.get(run.get("label"))
        paper_text = f"{claim.get('value')} ({claim.get('source')})" if isinstance(claim, dict) else "-"
        rows.append([
            _setting(run),
            f"{_metric(run)}, {_speed(run, reference)}",
            base_text,
            paper_text,
            f"`{bench.record['command']}`" if bench.record.get("command") else "-",
            str(bench.record.get("date", "-")),
            bench.machine,
        ])
    return rows


def _profiled(bench: Bench) -> bool:
    """A profiling run (``--profile``): its timings include the profiler's own cost, so it is listed apart."""
    return bool(bench.runs) and all("profile" in r for r in bench.runs if "error" not in r)


def _profile_section(benches: list[Bench], root_name: str) -> list[str]:
    profiled = [b for b in benches if _profiled(b)]
    if not profiled:
        return []
    lines = ["## Profiles", "", "Per-block profiles (`--profile`: share of step time, calls, matrix-product FLOPs and",
             "GFLOP/s per named block, beside the machine's measured matmul peaks); each bench's `results.md` has",
             "the tables. Their timings include the profiler's own cost, so the speed ratios above come from the",
             "unprofiled benches.", ""]
    for b in profiled:
        methods = ", ".join(str(r.get("label")) for r in b.runs)
        lines.append(f"- [{b.folder}]({root_name}/{b.folder}/results.md): {methods}; `{b.record.get('command', '-')}`, "
                     f"{b.record.get('date', '-')}, {b.machine}")
    return [*lines, ""]


def render_report(benches: list[Bench], root_name: str = "results") -> str:
    """The markdown of the results record (``root_name``: the folder of the bench outputs, for links)."""
    profiles = _profile_section(benches, root_name)
    benches = [b for b in benches if not _profiled(b)]
    families = sorted({method_family(str(r.get("method"))) for b in benches for r in b.runs} - set(BASELINES))
    lines = [
        "# Results",
        "",
        "The current state of every method: each row is one run of `liftkit bench`, beside the backprop baselines",
        "of the same bench (same data, model, initial weights, seed and machine). Speed ratios (in brackets) are to",
        "the bench's Adam run and mean something only inside one bench. Generated by `liftkit report docs/results`",
        "from the `results.json` files under `docs/results/`; do not edit by hand. History: `CHANGELOG.md`.",
        "",
    ]
    head = ["setting", "liftkit", "baselines (same bench)", "paper", "command", "date", "machine"]
    for family in families:
        lines += [f"## {_TITLES.get(family, family)}", ""]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for bench in benches:
            for row in _rows(bench, family):
                lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
        notes = [f"- `{b.folder}`: {b.record['notes']}" for b in benches if b.record.get("notes")
                 and any(method_family(str(r.get("method"))) == family for r in b.runs)]
        lines += ["", *notes, ""] if notes else [""]
    lines += profiles
    return "\n".join(lines).rstrip() + "\n"


def write_report(root: str | Path, out: str | Path | None = None) -> Path:
    """Write the record of the bench outputs under ``root`` to ``out`` (default: ``root`` + ``.md``)."""
    base = Path(root)
    target = Path(out) if out is not None else base.with_name(base.name + ".md")
    atomic_write_text(target, render_report(collect(base), base.name))
    return target
