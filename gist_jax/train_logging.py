"""Training metrics output: a tqdm progress bar on the console (loss, lr, tokens/s, ETA),
a JSON-lines file ``WORKDIR/metrics.jsonl`` (one object per logged step or evaluation),
and TensorBoard event files in ``WORKDIR/tensorboard``.

Only process 0 writes anything; the others get a logger whose methods do nothing, so the
training loop calls it unconditionally.
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


def read_metrics(workdir: str | os.PathLike, kind: str | None = "train") -> list[dict[str, Any]]:
    """The records of ``WORKDIR/metrics.jsonl`` (of one ``kind``: "train" / "eval" / ...)."""
    path = pathlib.Path(workdir) / METRICS_FILE
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if kind is None or r.get("kind") == kind]


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
        self.total_steps = total_steps
        self._start_step = start_step
        self._start_time = time.monotonic()
        self._bar = None
        self._want_bar = False
        self._tb = None
        self._file = None
        if not enabled:
            return
        workdir = pathlib.Path(workdir)
        self._file = open(workdir / METRICS_FILE, "a", buffering=1)  # noqa: SIM115 (long-lived)
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(workdir / TENSORBOARD_DIR))
        # Created at the first train record, so start-up messages print as plain lines.
        self._want_bar = progress_bar

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
        if self._want_bar and self._bar is None and kind == "train":
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=self.total_steps,
                initial=self._start_step,
                unit="step",
                dynamic_ncols=True,
                mininterval=1.0,
            )
        if self._bar is not None and kind == "train":
            self._bar.n = step
            self._bar.set_postfix(
                loss=f"{record.get('loss', float('nan')):.4f}",
                lr=f"{record.get('lr', 0.0):.2e}",
                tok_s=f"{record.get('tokens_per_s', 0.0):.0f}",
                refresh=False,
            )
            self._bar.refresh()
        elif self._bar is not None:
            shown = ", ".join(
                f"{k}={v:.4f}" for k, v in record.items() if isinstance(v, float) and k != "time"
            )
            self._bar.write(f"[{kind} @ step {step}] {shown}")

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
        if self._bar is not None:
            self._bar.close()
        self._tb.flush()
        self._tb.close()
        self._file.close()
