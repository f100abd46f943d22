"""What stops a training run early: SIGTERM (``StopSignal``: save at the current step and
exit cleanly, agreed on by every process) and non-finite steps (``NonFiniteGuard``: each
one is logged and skipped; ``train.max_nonfinite_steps`` in a row raise ``NonFiniteError``).
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax
from jax.experimental import multihost_utils

from gist_jax import checkpoint as ckpt_lib
from gist_jax.train.metrics_log import MetricsLogger


class StopSignal:
    """Turns SIGTERM into "save a checkpoint at the current step and exit 0".

    Single process: a Python handler sets a flag. Several processes: JAX's preemption sync
    manager (started by ``jax.distributed.initialize``, it owns SIGTERM) agrees on one step
    at which every process saves, whichever process got the signal.
    """

    def __init__(self, stop_at_step: int | None = None) -> None:
        self.stop_at_step = stop_at_step
        self._flag = threading.Event()
        self._multi = jax.process_count() > 1
        self._previous = None
        if not self._multi and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self._flag.set()

    def reached(self, step: int) -> bool:
        """True at the step where training should save and stop (same on all processes).

        Must be called at every step (the multi-process protocol counts on it)."""
        if self.stop_at_step is not None and step >= self.stop_at_step:
            return True
        if self._multi:
            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self._flag.is_set()

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient; the run stopped."""


class NonFiniteGuard:
    """Watches the steps' ``nonfinite`` flags (the step itself already skipped the update):
    logs each such step and raises ``NonFiniteError`` after ``limit`` in a row.

    Flags are read with a lag (``check(upto=step - 1)`` after dispatching ``step``) so the
    device always has the next step queued; checkpoints and logs check up to their step.
    """

    def __init__(self, limit: int, checkpointer: ckpt_lib.Checkpointer, logger: MetricsLogger):
        self.limit = limit
        self.consecutive = 0
        self._first = 0
        self._pending: list[tuple[int, dict[str, Any]]] = []
        self._checkpointer = checkpointer
        self._logger = logger

    def add(self, step: int, metrics: dict[str, Any]) -> None:
        self._pending.append((step, metrics))

    def check(self, upto: int) -> int:
        """Process the flags of steps ``<= upto``; returns the current run of bad steps."""
        ready = [(s, m) for s, m in self._pending if s <= upto]
        if not ready:
            return self.consecutive
        self._pending = [(s, m) for s, m in self._pending if s > upto]
        flags = jax.device_get([m["nonfinite"] for _, m in ready])
        for (step, metrics), flag in zip(ready, flags, strict=True):
            if not float(flag):
                self.consecutive = 0
                continue
            self.consecutive += 1
            self._first = step if self.consecutive == 1 else self._first
            values = {k: float(v) for k, v in jax.device_get(metrics).items()}
            self._logger.log(
                step,
                {
                    "loss": values["loss"],
                    "grad_norm": values["grad_norm"],
                    "lr": values["lr"],
                    "consecutive": self.consecutive,
                },
                kind="nonfinite",
            )
            self._logger.message(
                f"step {step}: loss {values['loss']} / gradient norm {values['grad_norm']}: "
                f"not finite, update skipped ({self.consecutive} in a row; the run stops at "
                f"train.max_nonfinite_steps={self.limit})"
            )
            if self.consecutive >= self.limit:
                self._stop(step)
        return self.consecutive

    def _stop(self, step: int) -> None:
        self._checkpointer.wait()
        last = self._checkpointer.latest_step()
        kept = (
            f"the last good checkpoint: step {last} in {self._checkpointer.directory}"
            if last is not None
            else "no checkpoint was written before them"
        )
        raise NonFiniteError(
            f"steps {self._first}-{step}: loss or gradient not finite {self.consecutive} times "
            f"in a row (train.max_nonfinite_steps={self.limit}); none of these updates was "
            f"applied and {kept}. Lower train.lr, check the data around these steps, or "
            "raise train.max_nonfinite_steps to ride it out."
        )
