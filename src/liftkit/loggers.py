"""Training logs for the usual tools: CSV files and TensorBoard event files.

:func:`liftkit.fit` takes ``loggers=[...]``: logger objects, or the names ``"csv"`` and ``"tensorboard"``
(which then write into ``log_dir``, by default the run's ``out_dir``). ``liftkit train --log tensorboard,csv``
does the same from the command line. Every epoch each logger receives the epoch's record: training and test
loss and accuracy, the cumulative training seconds and the epoch's own seconds, the mean step loss, and every
``StepStats`` diagnostic of the method averaged over the epoch (as ``info/<name>``). With ``log_every=N``
it also receives the loss and diagnostics of every N-th step (the values of that step, not an average).

Files (``DIR`` is the log directory):

* ``csv``: ``DIR/metrics.csv`` (one row per epoch) and, with ``log_every``, ``DIR/steps.csv`` (one row per
  logged step: ``step``, ``epoch``, ``batch``, ``loss``, diagnostics). A new diagnostic appearing later in a run
  rewrites the file with the wider header; rows that lack a column leave it empty.
* ``tensorboard``: event files in ``DIR/tensorboard/epochs`` (x axis: epoch) and ``DIR/tensorboard/steps``
  (x axis: global step), through ``torch.utils.tensorboard``. Needs the ``tensorboard`` package
  (``pip install 'liftkit[tensorboard]'``); open them with ``tensorboard --logdir DIR/tensorboard``.

A resumed run continues the logs of the run it resumes without duplicating epochs: the CSV files keep only
the rows up to the checkpoint's epoch before new rows are appended, and the TensorBoard writers start with a
purge step at the first epoch (and step) after the checkpoint, so TensorBoard and its event reader discard what
a killed run had logged past its last checkpoint.
"""

from __future__ import annotations

import csv
import io
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from liftkit.errors import LiftkitError

__all__ = ["LOGGERS", "CSVLogger", "Logger", "LoggerSet", "TensorBoardLogger", "make_loggers", "parse_log_names"]

#: The logger names ``--log`` accepts.
LOGGERS = ("csv", "tensorboard")

# Keys of fit's epoch record that are scalars worth a column / a TensorBoard tag, in this order.
_EPOCH_KEYS = (
    "train_loss", "test_loss", "train_accuracy", "test_accuracy", "seconds", "epoch_seconds", "step_loss"
)


def parse_log_names(text: str | Sequence[str] | None) -> list[str]:
    """``"tensorboard,csv"`` (or a list of names) -> the validated list of logger names, without repeats."""
    if text is None:
        return []
    parts = text.split(",") if isinstance(text, str) else list(text)
    names: list[str] = []
    for part in parts:
        name = str(part).strip().lower()
        if not name:
            continue
        if name not in LOGGERS:
            raise LiftkitError(f"unknown logger {name!r}; valid loggers: {', '.join(LOGGERS)}")
        if name not in names:
            names.append(name)
    if not names:
        raise LiftkitError(f"--log needs at least one logger name: {', '.join(LOGGERS)}")
    return names


def check_log_every(log_every: int | None) -> None:
    if log_every is not None and (isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1):
        raise LiftkitError(f"--log-every must be a positive number of steps, got {log_every!r}")


def epoch_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The loggable scalars of one epoch record of :func:`liftkit.fit` (``None`` values left out)."""
    values = {k: float(record[k]) for k in _EPOCH_KEYS if record.get(k) is not None}
    values.update({f"info/{k}": float(v) for k, v in (record.get("info") or {}).items()})
    return values


class Logger(ABC):
    """What :func:`liftkit.fit` calls. ``start`` runs before the first step (it must fail early on an unusable
    destination); ``log_epoch`` after each epoch's evaluation; ``log_step`` every ``log_every`` steps."""

    def start(self, *, start_epoch: int, start_step: int, run_info: Mapping[str, Any]) -> None:
        """Open the destination. ``start_epoch``/``start_step``: epochs and steps already done (resume)."""
        return None

    @abstractmethod
    def log_epoch(self, epoch: int, values: Mapping[str, float]) -> None:
        """``values``: :func:`epoch_scalars` of the epoch's record."""

    def log_step(self, step: int, epoch: int, batch: int, values: Mapping[str, float]) -> None:
        """``values``: the step's ``loss`` and diagnostics; ``step`` counts from 1 over the whole run."""
        return None

    def close(self) -> None:
        return None


def _prepare_dir(path: Path) -> Path:
    """Create ``path`` and prove it is writable, or raise the one-line error (before any training)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".liftkit-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise LiftkitError(f"cannot write logs to {path}: {reason}; choose a writable --log-dir") from None
    return path


class _CsvTable:
    """One CSV file whose rows are dicts; the header grows when a new column appears."""

    def __init__(self, path: Path, lead: Sequence[str]) -> None:
        self.path = path
        self.lead = list(lead)
        self.columns: list[str] = []

    def keep_rows(self, keep_epochs_through: int) -> None:
        """Drop the rows after epoch ``keep_epochs_through`` (a resumed run re-logs them); ``0`` empties it."""
        rows: list[dict[str, str]] = []
        if keep_epochs_through > 0 and self.path.exists():
            with open(self.path, newline="", encoding="utf-8") as fh:
                reader = csv.DictReader(fh)
                self.columns = list(reader.fieldnames or [])
                rows = [r for r in reader if r.get("epoch") and int(r["epoch"]) <= keep_epochs_through]
        self._rewrite(rows)

    def append(self, row: Mapping[str, Any]) -> None:
        new = [k for k in row if k not in self.columns]
        if new:
            # widen the header: read back what is there and write it again under the new columns
            with open(self.path, newline="", encoding="utf-8") as fh:
                old = list(csv.DictReader(fh))
            # the lead columns, then the others in the order they first appeared
            self.columns = [*(self.columns or self.lead), *(c for c in new if c not in self.lead)]
            self._rewrite(old)
        with open(self.path, "a", newline="", encoding="utf-8") as fh:
            csv.DictWriter(fh, fieldnames=self.columns).writerow({k: _cell(v) for k, v in row.items()})

    def _rewrite(self, rows: Iterable[Mapping[str, Any]]) -> None:
        buffer = io.StringIO()
        if self.columns:
            writer = csv.DictWriter(buffer, fieldnames=self.columns)
            writer.writeheader()
            writer.writerows(rows)
        from liftkit.io import atomic_write_text

        atomic_write_text(self.path, buffer.getvalue())


def _cell(value: Any) -> Any:
    # repr-exact floats: a reader gets back the very number the trainer computed
    return repr(value) if isinstance(value, float) else value


class CSVLogger(Logger):
    """``DIR/metrics.csv`` (per epoch) and ``DIR/steps.csv`` (per logged step). Needs nothing beyond Python."""

    def __init__(self, log_dir: str | os.PathLike[str]) -> None:
        self.log_dir = Path(log_dir)
        self._epochs = _CsvTable(self.log_dir / "metrics.csv", ["epoch"])
        self._steps = _CsvTable(self.log_dir / "steps.csv", ["step", "epoch", "batch"])
        self._steps_started = False
        self._start_epoch = 0

    def start(self, *, start_epoch: int, start_step: int, run_info: Mapping[str, Any]) -> None:
        _prepare_dir(self.log_dir)
        self._start_epoch = start_epoch
        self._epochs.keep_rows(start_epoch)

    def log_epoch(self, epoch: int, values: Mapping[str, float]) -> None:
        self._epochs.append({"epoch": epoch, **values})

    def log_step(self, step: int, epoch: int, batch: int, values: Mapping[str, float]) -> None:
        if not self._steps_started:
            # steps.csv is touched only by runs that log steps
            self._steps.keep_rows(self._start_epoch)
            self._steps_started = True
        self._steps.append({"step": step, "epoch": epoch, "batch": batch, **values})


def _summary_writer_class() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise LiftkitError(
            "TensorBoard logging needs the tensorboard package: pip install 'liftkit[tensorboard]'"
        ) from None
    return SummaryWriter


class TensorBoardLogger(Logger):
    """Event files under ``DIR/tensorboard/epochs`` and ``DIR/tensorboard/steps`` (``torch.utils.tensorboard``)."""

    def __init__(self, log_dir: str | os.PathLike[str]) -> None:
        self.log_dir = Path(log_dir) / "tensorboard"
        self._writer_cls = _summary_writer_class()  # fail at construction when the extra is missing
        self._epochs: Any = None
        self._steps: Any = None
        self._start_step = 0

    @staticmethod
    def check_available() -> None:
        """Raise the one-line error naming the extra when ``tensorboard`` is not installed."""
        _summary_writer_class()

    def start(self, *, start_epoch: int, start_step: int, run_info: Mapping[str, Any]) -> None:
        _prepare_dir(self.log_dir)
        # purge_step: readers drop what an earlier (killed) run logged at or after it, so a resume has no doubles
        self._epochs = self._writer_cls(str(self.log_dir / "epochs"), purge_step=start_epoch + 1)
        self._start_step = start_step

    def log_epoch(self, epoch: int, values: Mapping[str, float]) -> None:
        for tag, value in values.items():
            self._epochs.add_scalar(tag, value, global_step=epoch)
        # flushed every epoch: a killed run's event files hold every finished epoch
        for writer in (self._epochs, self._steps):
            if writer is not None:
                writer.flush()

    def log_step(self, step: int, epoch: int, batch: int, values: Mapping[str, float]) -> None:
        if self._steps is None:
            self._steps = self._writer_cls(str(self.log_dir / "steps"), purge_step=self._start_step + 1)
        for tag, value in values.items():
            self._steps.add_scalar(tag, value, global_step=step)

    def close(self) -> None:
        for writer in (self._epochs, self._steps):
            if writer is not None:
                writer.close()


def make_loggers(names: str | Sequence[str], log_dir: str | os.PathLike[str]) -> list[Logger]:
    """Logger objects for ``names`` (``"tensorboard,csv"`` or a list) writing into ``log_dir``."""
    classes: dict[str, type[CSVLogger] | type[TensorBoardLogger]] = {"csv": CSVLogger, "tensorboard": TensorBoardLogger}
    return [classes[name](log_dir) for name in parse_log_names(names)]


class LoggerSet:
    """The loggers of one :func:`liftkit.fit` call, fed by the trainer (only on the main process)."""

    def __init__(
        self,
        loggers: Sequence[Logger | str] | None,
        *,
        log_dir: str | os.PathLike[str] | None,
        log_every: int | None,
    ) -> None:
        check_log_every(log_every)
        names = [x for x in loggers or [] if isinstance(x, str)]
        objects = [x for x in loggers or [] if not isinstance(x, str)]
        if names:
            if log_dir is None:
                raise LiftkitError("logger names need a log directory: pass out_dir= or log_dir= to fit")
            objects += make_loggers(names, log_dir)
        for obj in objects:
            if not isinstance(obj, Logger):
                raise LiftkitError(f"loggers must be liftkit.loggers.Logger objects or names, got {obj!r}")
        self.loggers: list[Logger] = objects
        self.log_every = log_every
        self._seconds = 0.0

    def start(self, *, start_epoch: int, steps_per_epoch: int, seconds: float, run_info: Mapping[str, Any]) -> None:
        """Open every logger; ``seconds``: the training seconds of the epochs already done (resume)."""
        self._seconds = seconds
        for logger in self.loggers:
            logger.start(start_epoch=start_epoch, start_step=start_epoch * steps_per_epoch, run_info=run_info)

    def step(self, step: int, epoch: int, batch: int, loss: float, info: Mapping[str, float]) -> None:
        if not self.loggers or self.log_every is None or step % self.log_every != 0:
            return
        values = {"loss": float(loss), **{f"info/{k}": float(v) for k, v in info.items()}}
        for logger in self.loggers:
            logger.log_step(step, epoch, batch, values)

    def epoch(self, record: Mapping[str, Any]) -> None:
        # the record's seconds are cumulative; the epoch's own time is the difference
        values = epoch_scalars({**record, "epoch_seconds": float(record["seconds"]) - self._seconds})
        self._seconds = float(record["seconds"])
        for logger in self.loggers:
            logger.log_epoch(int(record["epoch"]), values)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()
