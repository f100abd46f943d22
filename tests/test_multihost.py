"""Multi-process training on localhost through ``launch/local.sh``: 2 processes x 2 CPU
devices (fsdp=2 x tensor=2, so params and batches span processes), preempted by SIGTERM
part-way and relaunched, give the same per-step losses as 1 process x 4 devices; and the
launcher's own contract (free port, per-process devices, failure of any process stops the
others and fails the launch)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest
from fixtures_train import QUICK, REPO, quick_config, step_losses

from gist_jax import train

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

LAUNCH = REPO / "launch" / "local.sh"
STEPS = 30
MESH = {"mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 2}
SETTINGS = {
    **QUICK,
    **MESH,
    "train.steps": STEPS,
    "train.checkpoint_every": 0,  # only the SIGTERM and final checkpoints
    "eval.splits": (),
}


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # conftest's 8 devices must not leak into the children
    env.update(
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(REPO / ".cache" / "jax"),
        PYTHONPATH=os.pathsep.join([str(REPO / "tests"), env.get("PYTHONPATH", "")]),
        **extra,
    )
    return env


def _cli_args(workdir) -> list[str]:
    args = [f"--config={REPO / 'configs' / 'tiny_llama.py'}", f"--workdir={workdir}"]
    for key, value in SETTINGS.items():
        args.append(
            f"--config.{key}={value!r}" if isinstance(value, tuple) else f"--config.{key}={value}"
        )
    return args


def _launch(workdir, log_path, processes=2, devices=2) -> subprocess.Popen:
    log = open(log_path, "ab")  # noqa: SIM115 (closed by the caller via the process)
    return subprocess.Popen(
        ["bash", str(LAUNCH), str(processes), "--", *_cli_args(workdir)],
        cwd=REPO,
        env=_env(GIST_DEVICES_PER_PROCESS=str(devices)),
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def _wait(proc: subprocess.Popen, log_path, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"launch timed out; log:\n{log_path.read_text()[-4000:]}") from None


def _steps_logged(workdir) -> int:
    try:
        return len(step_losses(workdir))
    except ValueError:  # a line being written right now
        return 0


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same run as 1 process x 4 devices (in this process)."""
    workdir = tmp_path_factory.mktemp("one_process")
    config = quick_config("tiny_llama", **{k.replace(".", "__"): v for k, v in SETTINGS.items()})
    result = train.train_and_evaluate(
        config, workdir, devices=jax.devices()[:4], progress_bar=False
    )
    assert result.step == STEPS
    return step_losses(workdir)


def test_two_processes_match_one_process_across_preemption(reference, tmp_path):
    workdir = tmp_path / "two_processes"
    log_path = tmp_path / "launch.log"
    proc = _launch(workdir, log_path)
    # Preempt the job once it is training: SIGTERM to the launcher reaches every process.
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if _steps_logged(workdir) >= 3:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.2)
    rc = _wait(proc, log_path, 240)
    log = log_path.read_text()
    assert rc == 0, log[-4000:]
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert len(saved) == 1 and 3 <= saved[0] < STEPS, (saved, log[-3000:])
    assert f"preempted at step {saved[0]}/{STEPS}" in log
    assert "mesh: data=1 fsdp=2 tensor=2 (4 devices, 2 processes)" in log

    proc = _launch(workdir, log_path)
    rc = _wait(proc, log_path, 240)
    log = log_path.read_text()
    assert rc == 0, log[-4000:]
    assert f"done at step {STEPS}/{STEPS}" in log
    losses = step_losses(workdir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    np.testing.assert_allclose(
        [losses[s] for s in range(1, STEPS + 1)],
        [reference[s] for s in range(1, STEPS + 1)],
        atol=1e-5,
    )


def test_launcher_stops_everyone_when_one_process_fails(tmp_path):
    start = time.monotonic()
    result = subprocess.run(
        ["bash", str(LAUNCH), "3", "--", "--extra=1"],
        cwd=REPO,
        env=_env(GIST_LAUNCH_MODULE="launch_probe", GIST_DEVICES_PER_PROCESS="3"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.monotonic() - start
    out = result.stdout + result.stderr
    assert result.returncode == 3, out
    assert elapsed < 30, elapsed  # the survivors were stopped, not waited for (60 s)
    for i in range(3):
        assert f"[{i}] probe {i}/3 at 127.0.0.1:" in out, out
    assert "args=['--extra=1']" in out
    assert "--xla_force_host_platform_device_count=3" in out
    assert "[0] probe 0 got SIGTERM" in out and "[2] probe 2 got SIGTERM" in out
    assert "never stopped" not in out
    # All processes were given the same coordinator.
    addresses = {
        line.split(" at ")[1].split()[0] for line in out.splitlines() if " at 127." in line
    }
    assert len(addresses) == 1


def test_launcher_usage_error():
    result = subprocess.run(["bash", str(LAUNCH)], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2 and "usage:" in result.stderr
