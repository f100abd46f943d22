"""Multi-process failures on localhost: when one process of a 2-process run dies, the other
exits non-zero with a clear message within 60 s instead of hanging in a collective; and
processes started with different configs refuse to train, naming what differs. Which of
two paths reports a dead peer first is a race (the failed collective reaching Python, or
the runtime aborting from C++), so the abort path is also tested on its own.

The processes are started directly with the command lines ``launch/local.sh`` uses (same
flags, same per-process CPU devices) rather than through the launcher, because the
launcher itself stops the survivors when one process fails (tested in test_multihost.py);
here the survivor must notice on its own, as it must on clusters whose scheduler does not.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from fixtures_train import QUICK, REPO, step_losses

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

DETECTION_BOUND_S = 60.0
SETTINGS = {
    **QUICK,
    "mesh.data": 1,
    "mesh.fsdp": 2,
    "mesh.tensor": 2,
    "train.steps": 400,  # far more than the test waits for
    "train.checkpoint_every": 0,
    "eval.splits": (),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(workdir, settings) -> list[str]:
    args = [f"--config={REPO / 'configs' / 'tiny_llama.py'}", f"--workdir={workdir}"]
    for key, value in settings.items():
        args.append(
            f"--config.{key}={value!r}" if isinstance(value, tuple) else f"--config.{key}={value}"
        )
    return args


def _start(tmp_path, port: int, index: int, settings: dict) -> tuple[subprocess.Popen, object]:
    """Process ``index`` of 2, as launch/local.sh starts it (2 CPU devices each)."""
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        JAX_COMPILATION_CACHE_DIR=str(REPO / ".cache" / "jax"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    )
    log_path = tmp_path / f"process_{index}.log"
    log = open(log_path, "wb")  # noqa: SIM115 (closed when the process is reaped)
    command = [
        sys.executable,
        "-u",
        "-m",
        "gist_jax.train",
        *_args(tmp_path / "run", settings),
        f"--coordinator_address=127.0.0.1:{port}",
        "--num_processes=2",
        f"--process_id={index}",
    ]
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, log_path


def _stop(*procs: subprocess.Popen) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("victim", [0, 1], ids=["coordinator_dies", "worker_dies"])
def test_survivor_exits_with_a_clear_message(tmp_path, victim):
    port = _free_port()
    procs = [_start(tmp_path, port, i, SETTINGS) for i in range(2)]
    survivor, survivor_log = procs[1 - victim]
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and all(p.poll() is None for p, _ in procs):
            try:
                if len(step_losses(tmp_path / "run")) >= 2:
                    break
            except ValueError:  # a line being written
                pass
            time.sleep(0.2)
        assert all(p.poll() is None for p, _ in procs), procs[0][1].read_text()[-3000:]
        assert len(step_losses(tmp_path / "run")) >= 2, "training never started"
        procs[victim][0].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        try:
            rc = survivor.wait(timeout=DETECTION_BOUND_S + 30)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"process {1 - victim} still running {DETECTION_BOUND_S + 30:.0f} s after process "
                f"{victim} was killed:\n{survivor_log.read_text()[-3000:]}"
            ) from None
        elapsed = time.monotonic() - killed
    finally:
        _stop(*(p for p, _ in procs))
    log = survivor_log.read_text(errors="replace")
    assert rc != 0, log[-3000:]
    assert elapsed < DETECTION_BOUND_S, (elapsed, log[-3000:])
    assert f"process {1 - victim} of 2: lost contact with another process" in log, log[-3000:]


def test_native_abort_ends_with_our_message():
    """abort() from native code (what JAX's distributed runtime calls when it loses a peer)
    ends in the one-line message and status 1, not a bare stack dump and status 134."""
    code = (
        "import os\n"
        "from gist_jax import distributed\n"
        "distributed.report_native_aborts('gist-train')\n"
        "print('installed', flush=True)\n"
        "os.abort()\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1, (done.returncode, done.stderr[-3000:])
    assert "installed" in done.stdout
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("gist-train: process 0 of 1: lost contact with another process"), last
    assert "Exiting with status 1." in last
    # The Python stacks are kept for aborts that have another cause.
    assert "line 5 in <module>" in done.stderr, done.stderr[-3000:]


def test_processes_with_different_configs_refuse_to_start(tmp_path):
    port = _free_port()
    other = {**SETTINGS, "mesh.fsdp": 4, "mesh.tensor": 1, "model.init.hidden_size": 32}
    procs = [_start(tmp_path, port, 0, SETTINGS), _start(tmp_path, port, 1, other)]
    try:
        rcs = [p.wait(timeout=240) for p, _ in procs]
    finally:
        _stop(*(p for p, _ in procs))
    logs = [log.read_text(errors="replace") for _, log in procs]
    for i, (rc, log) in enumerate(zip(rcs, logs, strict=True)):
        assert rc != 0, log[-3000:]
        assert f"process {i} of 2" in log and "started with different configs" in log, log[-3000:]
        for line in (
            "mesh.fsdp: process 0: 2, process 1: 4",
            "mesh.tensor: process 0: 2, process 1: 1",
            "model.init.hidden_size: process 0: 64, process 1: 32",
        ):
            assert line in log, (line, log[-3000:])
    # Refused before anything was written.
    assert not (tmp_path / "run").exists()
