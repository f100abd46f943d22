"""Crash-safety soak test for training: train the tiny model while killing it at random
moments, restart it with the same command each time, and check that the result equals an
uninterrupted run.

Each *attempt* starts ``python -m gist_jax.train`` (the real command line, a real process)
and interrupts it in one of these ways:

``kill_startup``  SIGKILL 0.5-3 s after start (imports, data, compilation)
``kill_step``     SIGKILL at a random moment a few steps after training (re)started
``kill_save``     SIGKILL while an asynchronous checkpoint is being written (as soon as
                  orbax's temporary ``<step>.orbax-checkpoint-tmp-*`` directory appears,
                  after a random 0-20 ms)
``kill_export``   SIGKILL while the final export is being written (``.export.tmp``)
``sigterm``       SIGTERM (preemption): must save at the current step and exit 0 in time
``finish``        no interruption: must finish (exit 0)

Before every start the newest *complete* checkpoint is noted (a step directory orbax has
finalised: renamed from its temporary name, with its metadata files); the run's log must
say it resumed from exactly that step. At the end (``verify``): the per-step losses in
``metrics.jsonl`` equal the uninterrupted run's bit for bit, with every step logged once;
the exported params equal the reference's; every checkpoint directory left restores and
equals the reference's checkpoint of the same step; and no temporary or half-deleted
directory is left behind.

    python -m benchmarks.probes.soak_crash --attempts=40 --steps=80 --out=/tmp/soak [--update_doc]

``--update_doc`` writes the result into docs/reliability.md (between the soak markers).
``tests/train/test_crash_safety.py`` runs the same machinery with a short, fixed plan.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "tiny_llama.py"
DOC = REPO / "docs" / "reliability.md"
DOC_BEGIN = "<!-- soak:begin -->"
DOC_END = "<!-- soak:end -->"

# Tiny, quick, deterministic: one padded length (one compilation), a checkpoint every
# step (so kills often land in a save), asynchronous saves, keep-2 (so old checkpoints
# are deleted while we kill), no validation loss, the final export on.
BASE_OVERRIDES: dict[str, Any] = {
    "data.bucket_multiple": 64,
    "data.num_train_examples": 400,
    "train.log_every": 1,
    "train.eval_every": 0,
    "train.checkpoint_every": 1,
    "train.keep_checkpoints": 2,
    "train.async_checkpoint": True,
    "train.export": True,
    "eval.splits": (),
}
ACTIONS = ("kill_startup", "kill_step", "kill_save", "kill_export", "sigterm", "finish")
TMP_MARK = ".orbax-checkpoint-tmp"
EXPORT_TMP = ".export.tmp"
SIGTERM_BOUND_S = 30.0  # a preempted run must have saved and exited within this


# ---------------------------------------------------------------------------------------
# Commands and the workdir as seen from outside


def train_command(workdir: pathlib.Path, overrides: Mapping[str, Any]) -> list[str]:
    """The ``gist_jax.train`` command line for ``workdir`` with ``--config.KEY=VALUE``s."""
    args = [sys.executable, "-u", "-m", "gist_jax.train", f"--config={CONFIG}"]
    args.append(f"--workdir={workdir}")
    for key, value in overrides.items():
        shown = repr(value) if isinstance(value, tuple) else value
        args.append(f"--config.{key}={shown}")
    return args


def child_env(devices: int = 2, cache_dir: pathlib.Path | None = None) -> dict[str, str]:
    """Environment for a training process: CPU, ``devices`` forced devices, and a
    persistent compilation cache so that restarts do not recompile."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir or REPO / ".cache" / "jax")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def complete_steps(workdir: pathlib.Path) -> list[int]:
    """Steps with a finalised checkpoint: an integer-named directory (orbax writes under a
    temporary name and renames when every file is written) holding its metadata files."""
    root = workdir / "checkpoints"
    if not root.is_dir():
        return []
    steps = []
    for path in root.iterdir():
        if not path.name.isdigit():
            continue
        needed = [
            path / "_CHECKPOINT_METADATA",
            path / "state" / "_METADATA",
            path / "state" / "manifest.ocdbt",
            path / "data" / "metadata",
        ]
        if all(p.exists() for p in needed):
            steps.append(int(path.name))
    return sorted(steps)


def leftovers(workdir: pathlib.Path) -> list[str]:
    """Temporary or half-deleted entries: orbax temporary step directories, anything in
    the deletion area, a temporary export."""
    found = []
    root = workdir / "checkpoints"
    if root.is_dir():
        for path in root.iterdir():
            if TMP_MARK in path.name:
                found.append(str(path.relative_to(workdir)))
            elif path.name.startswith(".") and path.is_dir() and any(path.iterdir()):
                found.extend(str(p.relative_to(workdir)) for p in path.iterdir())
    if (workdir / EXPORT_TMP).exists():
        found.append(EXPORT_TMP)
    return sorted(found)


def logged_train_steps(workdir: pathlib.Path) -> list[int]:
    """Steps of the ``train`` records in ``metrics.jsonl``, in file order (a line being
    written right now, or cut by a kill, is ignored)."""
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("kind") == "train":
            steps.append(int(record["step"]))
    return steps


def train_losses(workdir: pathlib.Path) -> list[tuple[int, float]]:
    """``(step, loss)`` of every train record, in file order, duplicates kept."""
    path = workdir / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]


# ---------------------------------------------------------------------------------------
# One attempt


@dataclasses.dataclass
class Attempt:
    """What one start of the training command did."""

    index: int
    action: str  # what was planned (ACTIONS)
    outcome: str  # what happened: killed_in_save, killed, preempted, finished, ...
    expected_resume: int | None  # newest complete checkpoint before the start
    resumed_from: int | None  # what the run's log says it restored
    rc: int | None
    seconds: float
    steps_before: int  # last logged step before the start
    steps_after: int  # last logged step after the process ended
    partial_left: list[str]  # temporary entries right after the process ended
    note: str = ""


def _last(steps: Sequence[int]) -> int:
    return max(steps) if steps else 0


def _wait_until(proc: subprocess.Popen, condition, timeout: float, interval: float) -> bool:
    """Poll ``condition`` until true (True) or the process ends / time runs out (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if condition():
            return True
        time.sleep(interval)
    return False


def _parse_resumed(log: str) -> int | None:
    found = re.findall(r"resumed from \S*/checkpoints/(\d+)", log)
    return int(found[-1]) if found else None


def run_attempt(
    index: int,
    action: str,
    workdir: pathlib.Path,
    command: Sequence[str],
    env: Mapping[str, str],
    log_path: pathlib.Path,
    rng: random.Random,
    timeout: float = 300.0,
) -> Attempt:
    """Start the command, interrupt it as ``action`` says, wait for it to end."""
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}; expected one of {ACTIONS}")
    expected = complete_steps(workdir)
    expected_resume = expected[-1] if expected else None
    before = _last(logged_train_steps(workdir))
    started = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            list(command), cwd=REPO, env=dict(env), stdout=log, stderr=subprocess.STDOUT
        )
    outcome, note = "exited", ""
    try:
        if action == "kill_startup":
            time.sleep(rng.uniform(0.5, 3.0))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                outcome = "killed"
        elif action == "kill_step":
            target = before + rng.randint(1, 3)
            if _wait_until(
                proc, lambda: _last(logged_train_steps(workdir)) >= target, timeout, 0.01
            ):
                time.sleep(rng.uniform(0.0, 0.1))
                proc.send_signal(signal.SIGKILL)
                outcome = "killed"
        elif action == "kill_save":
            # Let it train a step or two first, so that every attempt makes progress.
            target = before + rng.randint(1, 2)
            ckpt = workdir / "checkpoints"

            def saving() -> bool:
                if _last(logged_train_steps(workdir)) < target:
                    return False
                try:
                    return any(TMP_MARK in name for name in os.listdir(ckpt))
                except FileNotFoundError:
                    return False

            if _wait_until(proc, saving, timeout, 0.002):
                time.sleep(rng.uniform(0.0, 0.02))
                proc.send_signal(signal.SIGKILL)
                outcome = "killed_in_save"
        elif action == "kill_export":
            if _wait_until(proc, lambda: (workdir / EXPORT_TMP).exists(), timeout, 0.002):
                time.sleep(rng.uniform(0.0, 0.02))
                proc.send_signal(signal.SIGKILL)
                outcome = "killed_in_export"
        elif action == "sigterm":
            target = before + rng.randint(1, 3)
            if _wait_until(
                proc, lambda: _last(logged_train_steps(workdir)) >= target, timeout, 0.01
            ):
                time.sleep(rng.uniform(0.0, 0.1))
                signalled = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=SIGTERM_BOUND_S)
                    outcome = "preempted"
                    note = f"exited {time.monotonic() - signalled:.1f} s after SIGTERM"
                except subprocess.TimeoutExpired:
                    outcome = "sigterm_timeout"
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
        outcome = "timeout"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = log_path.read_text(errors="replace")
    if outcome == "exited" and rc == 0:
        outcome = "finished" if re.search(r"\bdone at step", log) else "exited"
    elif outcome == "preempted":
        match = re.search(r"preempted at step (\d+)/", log)
        note += f"; saved step {match.group(1)}" if match else "; no 'preempted at step' line"
    return Attempt(
        index=index,
        action=action,
        outcome=outcome,
        expected_resume=expected_resume,
        resumed_from=_parse_resumed(log),
        rc=rc,
        seconds=round(time.monotonic() - started, 2),
        steps_before=before,
        steps_after=_last(logged_train_steps(workdir)),
        partial_left=leftovers(workdir),
        note=note,
    )


def check_attempt(attempt: Attempt, log: str, workdir: pathlib.Path) -> list[str]:
    """Problems with one attempt: resumed from the wrong checkpoint, a preemption that
    did not save or exit 0 in time, a planned finish that did not finish."""
    problems = []
    a = attempt
    where = f"attempt {a.index} ({a.action})"
    reached_training = a.steps_after > a.steps_before or a.outcome in ("finished", "preempted")
    if a.resumed_from is not None and a.resumed_from != a.expected_resume:
        problems.append(
            f"{where}: resumed from step {a.resumed_from}, but the newest complete "
            f"checkpoint was {a.expected_resume}"
        )
    if a.resumed_from is None and a.expected_resume is not None and reached_training:
        problems.append(f"{where}: trained without resuming from checkpoint {a.expected_resume}")
    if "cannot be restored" in log:
        problems.append(f"{where}: a complete checkpoint could not be restored: {log[-500:]}")
    if a.action == "sigterm":
        if a.outcome != "preempted" or a.rc != 0:
            problems.append(f"{where}: SIGTERM gave {a.outcome}, status {a.rc}")
        else:
            match = re.search(r"preempted at step (\d+)/", log)
            steps = complete_steps(workdir)
            if not match or not steps or int(match.group(1)) != steps[-1]:
                problems.append(
                    f"{where}: preempted run's checkpoint is not the newest complete one "
                    f"({match.group(0) if match else 'no message'}; complete: {steps})"
                )
    if a.action == "finish" and (a.outcome != "finished" or a.rc != 0):
        problems.append(f"{where}: did not finish ({a.outcome}, status {a.rc}): {log[-1500:]}")
    if a.outcome == "timeout":
        problems.append(f"{where}: timed out: {log[-1500:]}")
    if a.outcome == "exited" and a.rc != 0 and a.action != "finish":
        problems.append(f"{where}: exited on its own with status {a.rc}: {log[-1500:]}")
    return problems


# ---------------------------------------------------------------------------------------
# The whole soak


@dataclasses.dataclass
class SoakResult:
    attempts: list[Attempt]
    problems: list[str]
    steps: int
    seconds: float
    reference_seconds: float

    @property
    def kills(self) -> int:
        return sum(a.outcome.startswith("killed") for a in self.attempts)

    def summary(self) -> dict[str, Any]:
        outcomes: dict[str, int] = {}
        for a in self.attempts:
            outcomes[a.outcome] = outcomes.get(a.outcome, 0) + 1
        return {
            "attempts": len(self.attempts),
            "kills": self.kills,
            "outcomes": outcomes,
            "killed_with_partial_checkpoint": sum(
                a.outcome == "killed_in_save" and any(TMP_MARK in p for p in a.partial_left)
                for a in self.attempts
            ),
            "killed_during_a_deletion": sum(
                any("/.deleting/" in p for p in a.partial_left) for a in self.attempts
            ),
            "restarts_resumed_from_newest_complete": sum(
                a.resumed_from is not None and a.resumed_from == a.expected_resume
                for a in self.attempts
            ),
            "steps": self.steps,
            "problems": self.problems,
            "seconds": round(self.seconds, 1),
        }


def reference_run(
    workdir: pathlib.Path, overrides: Mapping[str, Any], env: Mapping[str, str], timeout: float
) -> float:
    """The uninterrupted run (all checkpoints kept, to compare any step)."""
    if workdir.exists():
        shutil.rmtree(workdir)
    settings = dict(overrides, **{"train.keep_checkpoints": 0})
    started = time.monotonic()
    result = subprocess.run(
        train_command(workdir, settings),
        cwd=REPO,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise RuntimeError(f"reference run failed:\n{(result.stdout + result.stderr)[-3000:]}")
    return time.monotonic() - started


def interrupted_run(
    workdir: pathlib.Path,
    actions: Sequence[str],
    overrides: Mapping[str, Any],
    env: Mapping[str, str],
    seed: int,
    log_dir: pathlib.Path,
    timeout: float = 300.0,
) -> tuple[list[Attempt], list[str]]:
    """Run the attempts in order; keep restarting with ``finish`` until the run is done."""
    if workdir.exists():
        shutil.rmtree(workdir)
    log_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    command = train_command(workdir, overrides)
    attempts, problems = [], []
    plan = list(actions)
    while plan:
        action = plan.pop(0)
        log_path = log_dir / f"attempt_{len(attempts):03d}_{action}.log"
        attempt = run_attempt(len(attempts), action, workdir, command, env, log_path, rng, timeout)
        attempts.append(attempt)
        problems += check_attempt(attempt, log_path.read_text(errors="replace"), workdir)
        if action == "finish" and attempt.outcome != "finished":
            break
        if not plan and attempt.outcome != "finished":
            plan.append("finish")
    return attempts, problems


def _restore_raw(step_dir: pathlib.Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A checkpoint's train state (numpy) and data state, read without a target."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    device = jax.devices("cpu")[0]
    with ocp.StandardCheckpointer() as checkpointer:
        meta = checkpointer.metadata(step_dir / "state")
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(
                m.shape, m.dtype, sharding=jax.sharding.SingleDeviceSharding(device)
            ),
            tree,
        )
        state = jax.tree.map(np.asarray, checkpointer.restore(step_dir / "state", target))
    data = json.loads((step_dir / "data" / "metadata").read_text())
    return state, data


def verify(workdir: pathlib.Path, reference: pathlib.Path, steps: int) -> list[str]:
    """Compare a finished interrupted run with the reference (see the module docstring)."""
    import numpy as np

    problems = []
    got, want = train_losses(workdir), train_losses(reference)
    got_steps = [s for s, _ in got]
    if got_steps != list(range(1, steps + 1)):
        problems.append(f"metrics.jsonl train steps are {got_steps}, expected 1..{steps} once each")
    mismatched = [(s, a, b) for (s, a), (_, b) in zip(got, want, strict=False) if a != b]
    if mismatched:
        problems.append(
            f"losses differ from the uninterrupted run at (step, got, want): {mismatched[:5]}"
        )
    left = leftovers(workdir)
    if left:
        problems.append(f"temporary entries left: {left}")
    root = workdir / "checkpoints"
    complete = complete_steps(workdir)
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if path.name.isdigit() and int(path.name) not in complete:
            problems.append(f"{path} is named like a finished checkpoint but is incomplete")
    if steps not in complete:
        problems.append(f"no final checkpoint {steps}; complete: {complete}")
    for step in complete:
        try:
            state, data = _restore_raw(root / str(step))
            ref_state, ref_data = _restore_raw(reference / "checkpoints" / str(step))
        except Exception as err:  # any failure to read is what we are looking for
            problems.append(f"checkpoint {step} does not restore: {type(err).__name__}: {err}")
            continue
        if int(state["step"]) != step or data != ref_data:
            problems.append(f"checkpoint {step}: step {state['step']}, data {data} vs {ref_data}")
        leaves = zip(_leaves(state), _leaves(ref_state), strict=True)
        if not all(np.array_equal(a, b) for a, b in leaves):
            problems.append(f"checkpoint {step}: state differs from the uninterrupted run's")
    from gist_jax.convert import loading

    try:
        _, params, _ = loading.load_checkpoint(workdir / "export")
        _, ref_params, _ = loading.load_checkpoint(reference / "export")
        leaves = zip(_leaves(params), _leaves(ref_params), strict=True)
        if not all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in leaves):
            problems.append("exported params differ from the uninterrupted run's")
    except Exception as err:
        problems.append(f"export does not load: {type(err).__name__}: {err}")
    return problems


def _leaves(tree: Any) -> list[Any]:
    import jax

    return jax.tree.leaves(tree)


def soak(
    out: pathlib.Path,
    actions: Sequence[str],
    steps: int,
    seed: int = 0,
    devices: int = 2,
    extra_overrides: Mapping[str, Any] | None = None,
    timeout: float = 300.0,
) -> SoakResult:
    """Reference run, interrupted run, verification; everything under ``out``."""
    overrides = {**BASE_OVERRIDES, "train.steps": steps, **(extra_overrides or {})}
    env = child_env(devices)
    started = time.monotonic()
    reference_s = reference_run(out / "reference", overrides, env, timeout)
    attempts, problems = interrupted_run(
        out / "interrupted", actions, overrides, env, seed, out / "logs", timeout
    )
    problems += verify(out / "interrupted", out / "reference", steps)
    return SoakResult(attempts, problems, steps, time.monotonic() - started, reference_s)


def random_plan(attempts: int, rng: random.Random) -> list[str]:
    """Mostly kills (half of them during checkpoint writes), some preemptions, one kill
    during the export near the end, then finish."""
    weights = {"kill_save": 5, "kill_step": 3, "kill_startup": 1, "sigterm": 1}
    names, w = zip(*weights.items(), strict=True)
    plan = rng.choices(names, weights=w, k=max(attempts - 2, 0))
    return [*plan, "kill_export", "finish"]


def markdown(result: SoakResult, command: str) -> str:
    s = result.summary()
    sigterm = [a.note.split(" s after")[0].removeprefix("exited ") for a in result.attempts]
    sigterm = [t for t, a in zip(sigterm, result.attempts, strict=True) if a.outcome == "preempted"]
    lines = [
        f"Last soak: `{command}` on {time.strftime('%Y-%m-%d')} "
        f"({os.cpu_count()} CPU cores), {s['seconds']} s.",
        "",
        "| | |",
        "|---|---|",
        f"| attempts (process starts) | {s['attempts']} |",
        f"| SIGKILLs | {s['kills']} |",
        f"| outcomes | {', '.join(f'{k}: {v}' for k, v in sorted(s['outcomes'].items()))} |",
        f"| kills that left a partial (temporary) checkpoint | {s['killed_with_partial_checkpoint']} |",
        f"| kills that interrupted the deletion of an old checkpoint | {s['killed_during_a_deletion']} |",
        f"| restarts that resumed, all from the newest complete checkpoint | "
        f"{s['restarts_resumed_from_newest_complete']} |",
        f"| preemptions: seconds from SIGTERM to exit 0 | {', '.join(sigterm) or '-'} |",
        f"| training steps | {s['steps']} |",
        "| checked at the end | per-step losses bit-identical to the uninterrupted run and "
        "each step logged once; every remaining checkpoint and the exported params equal to "
        "the reference run's; no temporary or half-deleted directory left |",
        f"| problems | {len(s['problems'])} {'(' + '; '.join(s['problems'][:5]) + ')' if s['problems'] else ''} |",
    ]
    return "\n".join(lines)


def update_doc(text: str, doc: pathlib.Path = DOC) -> None:
    """Replace the block between the soak markers in ``doc``."""
    content = doc.read_text()
    begin, end = content.index(DOC_BEGIN) + len(DOC_BEGIN), content.index(DOC_END)
    doc.write_text(content[:begin] + "\n" + text + "\n" + content[end:])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attempts", type=int, default=40, help="process starts, finish included")
    parser.add_argument("--steps", type=int, default=80, help="training steps of the run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--devices", type=int, default=2, help="forced CPU devices")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("/tmp/gist_soak"))
    parser.add_argument("--update_doc", action="store_true", help=f"write the result to {DOC}")
    parser.add_argument(
        "--report_only", action="store_true", help="re-report OUT/summary.json, run nothing"
    )
    args = parser.parse_args(argv)
    shown = (
        f"python -m benchmarks.probes.soak_crash --attempts={args.attempts} --steps={args.steps} "
        f"--seed={args.seed}"
    )
    if args.report_only:
        saved = json.loads((args.out / "summary.json").read_text())
        result = SoakResult(
            [Attempt(**a) for a in saved["attempts"]],
            saved["summary"]["problems"],
            saved["summary"]["steps"],
            saved["summary"]["seconds"],
            0.0,
        )
        print(markdown(result, shown))
        if args.update_doc:
            update_doc(markdown(result, shown))
        return 1 if result.problems else 0
    plan = random_plan(args.attempts, random.Random(args.seed))
    result = soak(args.out, plan, args.steps, args.seed, args.devices)
    for a in result.attempts:
        print(json.dumps(dataclasses.asdict(a)))
    print(json.dumps(result.summary(), indent=2))
    (args.out / "summary.json").write_text(
        json.dumps(
            {
                "summary": result.summary(),
                "attempts": [dataclasses.asdict(a) for a in result.attempts],
            },
            indent=2,
        )
    )
    if args.update_doc:
        update_doc(markdown(result, shown))
    return 1 if result.problems else 0


if __name__ == "__main__":
    sys.exit(main())
