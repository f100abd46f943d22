"""Training checkpoints: an orbax ``CheckpointManager`` in ``WORKDIR/checkpoints`` that
saves the whole train state (step, params, optimizer state, RNG) plus the data iterator's
position, asynchronously, keeping the last K; restores onto whatever mesh the current run
uses; and guards a workdir against being resumed with a different model.

Layout::

    WORKDIR/
      model_config.json          the model config of the run (checked on resume)
      checkpoints/<step>/state/  orbax PyTree of the TrainState (sharded arrays)
      checkpoints/<step>/data/   JSON: the data iterator state (written by process 0)

Every process must call ``save`` / ``restore`` (orbax coordinates the writes: each process
writes its own shards, process 0 the metadata and the JSON). The data iterator state is a
property of the global example stream (identical on every process), so one copy suffices.

Restoring passes abstract arrays carrying the *current* shardings, so a checkpoint written
on 4 devices restores on 2 or 8 (orbax/tensorstore re-slices the stored arrays).

Crash safety (tested by killing real runs, see docs/reliability.md): orbax writes a step
under ``<step>.orbax-checkpoint-tmp`` and renames it when every file is written, and only
integer-named directories count as checkpoints, so a run killed mid-save leaves a temporary
directory that is ignored and removed at the next start (``cleanup``, for the writer).
Old checkpoints beyond ``keep`` are first renamed into ``checkpoints/.deleting/`` and only
then deleted, so a kill during a deletion never leaves a half-deleted ``<step>`` that a
restore would pick. ``restore_latest`` restores the newest checkpoint and, should it be
unreadable all the same (storage corruption), moves it aside as
``<step>.unreadable-<time>`` and falls back to the one before.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp

from gist_jax import files

CHECKPOINT_DIR = "checkpoints"
# Where orbax moves checkpoints beyond `keep` before we delete them (atomic rename first).
DELETING_DIR = ".deleting"
MODEL_CONFIG_FILE = "model_config.json"
# Fields of a model config that may change between runs on the same workdir: they change
# how the model is run, not its parameters. (scan_layers is not one: it changes the layout.)
RESUMABLE_RUNTIME_FIELDS = ("dtype", "remat", "attention")


class CheckpointError(ValueError):
    """A workdir or checkpoint that cannot be used for this run; the message says why."""


class UnreadableCheckpointError(CheckpointError):
    """A checkpoint whose files cannot be read (as opposed to one of another model)."""


def check_workdir_writable(workdir: str | os.PathLike) -> pathlib.Path:
    """Create ``workdir`` if needed and check that it can be written; clear error if not."""
    path = pathlib.Path(workdir).absolute()
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"workdir {path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CheckpointError(f"workdir {path} cannot be created: {err}") from err
    probe = path / f".write-test-{os.getpid()}"
    try:
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise CheckpointError(f"workdir {path} is not writable: {err}") from err
    return path


def _comparable(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in RESUMABLE_RUNTIME_FIELDS}


def check_model_config(
    workdir: str | os.PathLike, model_config: Mapping[str, Any], write: bool = True
) -> None:
    """Compare ``model_config`` with ``WORKDIR/model_config.json`` if the workdir has one
    (raising ``CheckpointError`` that lists the differing fields), else write it
    (``write``: process 0 only)."""
    path = pathlib.Path(workdir) / MODEL_CONFIG_FILE
    current = json.loads(json.dumps(dict(model_config)))  # normalise tuples -> lists
    if path.is_file():
        saved = json.loads(path.read_text())
        a, b = _comparable(saved), _comparable(current)
        diffs = [
            f"{k}: workdir has {a.get(k, '<absent>')!r}, this run has {b.get(k, '<absent>')!r}"
            for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)
        ]
        if diffs:
            raise CheckpointError(
                f"{path} describes a different model than this run's config, so its checkpoints "
                "cannot be resumed (use another --workdir): " + "; ".join(diffs)
            )
        return
    if write:
        files.atomic_write_text(path, json.dumps(current, indent=2, sort_keys=True) + "\n")


def _shape_problems(saved_tree: Any, abstract_tree: Any, prefix: str) -> list[str]:
    saved = {
        jax.tree_util.keystr(p): tuple(getattr(x, "shape", ()))
        for p, x in jax.tree_util.tree_flatten_with_path(saved_tree)[0]
    }
    want = {
        jax.tree_util.keystr(p): tuple(x.shape)
        for p, x in jax.tree_util.tree_flatten_with_path(abstract_tree)[0]
    }
    problems = [f"{prefix}{k} missing from checkpoint" for k in want if k not in saved]
    problems += [f"{prefix}{k} in checkpoint but not in this model" for k in saved if k not in want]
    problems += [
        f"{prefix}{k}: checkpoint {saved[k]}, this run {want[k]}"
        for k in want
        if k in saved and saved[k] != want[k]
    ]
    return problems


class Checkpointer:
    """Save/restore ``TrainState`` + data iterator state under ``WORKDIR/checkpoints``."""

    def __init__(
        self,
        workdir: str | os.PathLike,
        keep: int | None = 3,
        async_save: bool = True,
        cleanup: bool = False,
    ) -> None:
        """``cleanup``: this is the run that writes the checkpoints; remove what an earlier,
        killed run left (temporary step directories, the deletion area). Never set it in
        a reader (evaluation) that may run beside a training run: it would delete the
        checkpoint the trainer is writing."""
        self._cleanup = cleanup
        self.directory = pathlib.Path(workdir).absolute() / CHECKPOINT_DIR
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep if keep and keep > 0 else None,
            enable_async_checkpointing=async_save,
            # We decide when to save (every N steps, at the end, on SIGTERM).
            save_interval_steps=1,
            create=True,
            # Crash safety, see the module docstring.
            cleanup_tmp_directories=cleanup,
            todelete_subdir=DELETING_DIR,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": ocp.JsonCheckpointHandler(),
            },
        )

        self._empty_deleting()

    def _empty_deleting(self) -> None:
        """Delete what orbax moved into ``.deleting`` (process 0; orbax's deleter also only
        acts there). Called at start, after each save and at close, by the writer."""
        if not self._cleanup or jax.process_index() != 0:
            return
        root = self.directory / DELETING_DIR
        if root.is_dir():
            for path in root.iterdir():
                shutil.rmtree(path, ignore_errors=True)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, data_state: Mapping[str, Any] | None) -> bool:
        """Start saving (returns once the arrays are copied; the write continues in the
        background). A step that is already saved is skipped."""
        if step in self._manager.all_steps():
            return False
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(dict(data_state or {})),
        )
        saved = self._manager.save(step, args=args, force=True)
        # The previous save, and its deletions, finished before this one started.
        self._empty_deleting()
        return saved

    def check_compatible(self, step: int, abstract_params: Any) -> None:
        """Raise ``CheckpointError`` listing the param arrays whose shapes differ."""
        try:
            saved = self._manager.item_metadata(step)["state"]
        except Exception as err:  # orbax raises several types for unreadable metadata
            raise UnreadableCheckpointError(
                f"{self.directory}/{step}: unreadable checkpoint ({err})"
            ) from err
        saved_tree = getattr(saved, "tree", saved)
        if not isinstance(saved_tree, Mapping) or "params" not in saved_tree:
            raise CheckpointError(f"{self.directory}/{step}: not a gist_jax train state checkpoint")
        problems = _shape_problems(saved_tree["params"], abstract_params, "params")
        if problems:
            raise CheckpointError(
                f"checkpoint {self.directory}/{step} was written for a different model: "
                + "; ".join(problems[:8])
                + (f" (and {len(problems) - 8} more)" if len(problems) > 8 else "")
            )

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """The state at ``step`` (default: latest) placed on ``abstract_state``'s shardings,
        and the data iterator state saved with it."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        self.check_compatible(step, abstract_state.params)
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=ocp.args.JsonRestore(),
                ),
            )
        except json.JSONDecodeError as err:  # the data state file is cut short
            raise UnreadableCheckpointError(
                f"{self.directory}/{step}: unreadable data iterator state ({err})"
            ) from err
        except (ValueError, KeyError, TypeError) as err:
            raise CheckpointError(
                f"cannot restore {self.directory}/{step} into this run's train state (same "
                f"model, but a different optimizer state layout: was train.frozen_layers, "
                f"train.frozen_params or train.lr_scales changed?): {err}"
            ) from err
        return restored.state, dict(restored.data or {})

    def restore_params(self, abstract_params: Any, logical_axes: Any, mesh: Any, step: int) -> Any:
        """Only the params of the state saved at ``step`` (the optimizer state is not read),
        placed with their logical-axis shardings on ``mesh``, or on the default device
        without a mesh: what evaluation and serving need, whatever optimizer trained them."""
        from gist_jax import sharding

        if mesh is None:
            device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            shardings = jax.tree.map(lambda _: device, abstract_params)
        else:
            shardings = sharding.tree_shardings(abstract_params, logical_axes, mesh)
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            abstract_params,
            shardings,
        )
        self.check_compatible(step, target)
        restored = ocp.PyTreeCheckpointer().restore(
            self.directory / str(step) / "state",
            args=ocp.args.PyTreeRestore(
                item={"params": target},
                restore_args=ocp.checkpoint_utils.construct_restore_args({"params": target}),
                partial_restore=True,
            ),
        )
        return restored["params"]

    def restore_latest(
        self, abstract_state: Any, warn: Callable[[str], None] = print
    ) -> tuple[int, Any, dict[str, Any]] | None:
        """``(step, state, data_state)`` from the newest checkpoint that can be restored, or
        None when there is none.

        A checkpoint of another model is an error (``CheckpointError``), never skipped. One
        that cannot be read (a file cut short or missing: storage corruption, since orbax
        only ever shows finished checkpoints) is moved aside as ``<step>.unreadable-<time>``
        with a ``warn``ing and the previous one is tried. With several processes that is
        an error instead (they could disagree about which step they read): the message
        says how to move the checkpoint aside by hand.
        """
        for step in sorted(self.all_steps(), reverse=True):
            try:
                state, data_state = self.restore(abstract_state, step)
                return step, state, data_state
            except UnreadableCheckpointError as err:
                self._set_aside(step, err, warn)
            except CheckpointError:
                raise
            except Exception as err:  # tensorstore/orbax/json raise many types
                self._set_aside(step, err, warn)
        return None

    def _set_aside(self, step: int, err: Exception, warn: Callable[[str], None]) -> None:
        reason = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:300]}"
        if jax.process_count() > 1:
            raise CheckpointError(
                f"checkpoint {self.directory}/{step} cannot be restored ({reason}); to resume "
                f"from the previous checkpoint, move it aside: mv {self.directory}/{step} "
                f"{self.directory}/{step}.unreadable"
            ) from err
        aside = self.directory / f"{step}.unreadable-{int(time.time())}"
        os.rename(self.directory / str(step), aside)
        self._manager.reload()
        warn(
            f"warning: checkpoint {step} cannot be restored ({reason}); moved it to "
            f"{aside.name}, resuming from the checkpoint before it"
        )

    def wait(self) -> None:
        """Block until pending asynchronous saves have been committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
        self._empty_deleting()
