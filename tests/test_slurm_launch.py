"""launch/slurm.sbatch's control flow without a SLURM cluster: ``srun`` and ``scontrol``
are replaced by shims on PATH (srun runs the task command itself, scontrol records its
arguments), the training is the real ``gist_jax.train`` on the tiny config. A run stopped
by SIGTERM before its last step requeues the job and the script exits 0; a SIGTERM to the
batch shell reaches the task, which saves; a finished run exits 0 without a requeue."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow]


@pytest.fixture
def shims(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # srun OPTIONS... COMMAND...: drop the options, run the one task in place.
    (bin_dir / "srun").write_text(
        '#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n'
    )
    log = tmp_path / "scontrol.log"
    (bin_dir / "scontrol").write_text(f'#!/usr/bin/env bash\necho "$@" >> {log}\n')
    for shim in bin_dir.iterdir():
        shim.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242")
    env.update(GIST_PYTHON=sys.executable, PYTHONUNBUFFERED="1")
    return env, log


def _sbatch(env, workdir, steps):
    return subprocess.Popen(
        [
            "bash",
            str(REPO / "launch" / "slurm.sbatch"),
            "--config=configs/tiny_llama.py",
            f"--workdir={workdir}",
            f"--config.train.steps={steps}",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_sigterm_to_the_batch_shell_saves_and_requeues(shims, tmp_path):
    env, log = shims
    job = _sbatch(env, tmp_path / "run", steps=100000)
    output = []
    deadline = time.monotonic() + 240
    for line in job.stdout:
        output.append(line)
        if "first step done" in line or time.monotonic() > deadline:
            break
    time.sleep(2)
    job.send_signal(signal.SIGTERM)  # what `scancel --signal=TERM --batch` does
    rest, _ = job.communicate(timeout=240)
    text = "".join(output) + rest
    assert job.returncode == 0, text[-3000:]
    assert "preempted at step" in text and "requeueing job 4242" in text, text[-3000:]
    assert log.read_text().split() == ["requeue", "4242"]
    assert any((tmp_path / "run" / "checkpoints").iterdir())


def test_a_finished_run_completes_without_requeue(shims, tmp_path):
    env, log = shims
    job = _sbatch(env, tmp_path / "run", steps=2)
    out, _ = job.communicate(timeout=300)
    assert job.returncode == 0, out[-3000:]
    assert "done at step 2/2" in out
    assert not log.exists()
