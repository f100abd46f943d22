"""Training metrics output: a tqdm progress bar on the console (loss, lr, tokens/s, ETA),
a JSON-lines file ``WORKDIR/metrics.jsonl`` (one object per logged step or evaluation),
and TensorBoard event files in ``WORKDIR/tensorboard``.

Only process 0 writes anything; the others get a logger whose methods do nothing, so the
training loop calls it unconditionally.

A run that resumes from the checkpoint at step S continues the log from S: records after
S (written by the crashed or preempted run for steps it is about to redo) and a last line
cut short by a kill are removed first, and TensorBoard hides its events after S
(``purge_step``), so every step appears once, as in an uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import time
from collections.abc import Mapping
from typing import Any

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _jsonable(value: Any) -> Any:
    try:
        value = float(value) if not isinstance(value, int | str | bool) else value
    except (TypeError, ValueError):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _parse_lines(text: str) -> tuple[list[dict[str, Any]], int]:
    """Records of a JSON-lines text and the number of lines that are not valid JSON (a line
    cut short by a kill, or one being written right now)."""
    records, bad = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            bad += 1
    return records, bad


def read_metrics(workdir: str | os.PathLike, kind: str | None = "train") -> list[dict[str, Any]]:
    """The records of ``WORKDIR/metrics.jsonl`` (of one ``kind``: "train" / "eval" / ...);
    an incomplete line is skipped."""
    path = pathlib.Path(workdir) / METRICS_FILE
    if not path.is_file():
        return []
    records, _ = _parse_lines(path.read_text())
    return [r for r in records if kind is None or r.get("kind") == kind]


def truncate_metrics(workdir: str | os.PathLike, step: int) -> int:
    """Keep only the records of ``WORKDIR/metrics.jsonl`` up to ``step`` (and drop lines
    that are not valid JSON); rewritten atomically. Returns how many lines were removed."""
    path = pathlib.Path(workdir) / METRICS_FILE
    if not path.is_file():
        return 0
    records, bad = _parse_lines(path.read_text())
    kept = [r for r in records if int(r.get("step", 0)) <= step]
    removed = len(records) - len(kept) + bad
    if removed:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, path)
    return removed


def _summary_writer_class() -> Any:
    """tensorboardX's ``SummaryWriter``. tensorboardX imports torch, which takes seconds, only
    to accept torch tensors; we log Python floats, so unless torch is loaded already it is
    hidden during the import (every restart of a preempted run pays this start-up time)."""
    import sys

    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` now fails fast
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricsLogger:
    """Console bar + JSON lines + TensorBoard, on process 0 only."""

    def __init__(
        self,
        workdir: str | os.PathLike,
        total_steps: int,
        start_step: int = 0,
        enabled: bool = True,
        progress_bar: bool = True,
    ) -> None:
        self.enabled = enabled
        self.removed_records = 0
        self.total_steps = total_steps
        self._start_step = start_step
        self._start_time = time.monotonic()
        self._bar = None
        self._want_bar = False
        self._console = False  # evaluation records on the console (with the bar)
        self._tb = None
        self._file = None
        if not enabled:
            return
        workdir = pathlib.Path(workdir)
        # Continue the log from the step this run starts at (see the module docstring).
        self.removed_records = truncate_metrics(workdir, start_step)
        self._file = open(workdir / METRICS_FILE, "a", buffering=1)  # noqa: SIM115 (long-lived)
        self._tb = _summary_writer_class()(
            str(workdir / TENSORBOARD_DIR), purge_step=start_step + 1
        )
        # Created by start_bar, so start-up messages print as plain lines.
        self._want_bar = self._console = progress_bar

    def eta_seconds(self, step: int) -> float:
        """Remaining time extrapolated from this run's own steps (restarts included)."""
        done = step - self._start_step
        if done <= 0:
            return float("nan")
        rate = (time.monotonic() - self._start_time) / done
        return rate * (self.total_steps - step)

    def log(self, step: int, metrics: Mapping[str, Any], kind: str = "train") -> None:
        """Record ``metrics`` at ``step`` (process 0 only)."""
        if not self.enabled:
            return
        record = {"kind": kind, "step": int(step), "time": time.time()}
        record.update({k: _jsonable(v) for k, v in metrics.items()})
        if kind == "train" and "eta_s" not in record:
            record["eta_s"] = _jsonable(self.eta_seconds(step))
        self._file.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key not in ("kind", "step", "time") and isinstance(value, int | float):
                self._tb.add_scalar(f"{kind}/{key}", value, step)
        if self._bar is not None and kind == "train":
            self._bar.n = step
            self._bar.set_postfix(
                loss=f"{record.get('loss', float('nan')):.4f}",
                lr=f"{record.get('lr', 0.0):.2e}",
                tok_s=f"{record.get('tokens_per_s', 0.0):.0f}",
                refresh=False,
            )
            if step >= self.total_steps:
                self.close_bar()  # closing draws the final state once
            else:
                self._bar.refresh()
        elif kind != "train" and self._console:
            shown = ", ".join(
                f"{k}={v:.4f}" for k, v in record.items() if isinstance(v, float) and k != "time"
            )
            self.message(f"[{kind} @ step {step}] {shown}")  # also after the bar has closed

    def start_bar(self, step: int) -> None:
        """Show the bar before the first step, at ``step``, marked as compiling (process 0,
        when a bar was asked for)."""
        if not self._want_bar or self._bar is not None:
            return
        from tqdm.auto import tqdm

        # smoothing=0: the rate is steps since the clock started over the time since, which
        # first_step_done restarts after compilation, so rate and ETA are the steps' own.
        self._bar = tqdm(
            total=self.total_steps,
            initial=step,
            unit="step",
            dynamic_ncols=True,
            mininterval=1.0,
            smoothing=0,
            desc="compiling",
        )
        self._bar.refresh()

    def first_step_done(self, step: int) -> None:
        """The first step (compilation included) ended at ``step``: count from here."""
        if self._bar is None:
            return
        self._bar.n = self._bar.initial = self._bar.last_print_n = step
        self._bar.start_t = self._bar.last_print_t = self._bar._time()
        self._bar.set_description("training", refresh=False)
        self._bar.refresh()

    def close_bar(self) -> None:
        """End the bar (the last step, or a stop); later lines print plainly."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            self._want_bar = False

    def message(self, text: str) -> None:
        """A line on the console that does not break the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self.close_bar()
        self._tb.flush()
        self._tb.close()
        self._file.close()
