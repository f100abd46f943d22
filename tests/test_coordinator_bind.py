"""A local multi-process run listens on loopback only: JAX's coordination service has no
authentication, so process 0 must not accept connections on every interface."""

from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import time

import pytest

from gist_jax import distributed

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_bind_address_is_the_coordinator_address_unless_asked():
    assert distributed.bind_address("127.0.0.1:1234", env={}) == "127.0.0.1:1234"
    assert distributed.bind_address("node001:1234", env={}) == "node001:1234"
    asked = {distributed.BIND_ENV: "0.0.0.0:1234"}
    assert distributed.bind_address("node001:1234", env=asked) == "0.0.0.0:1234"


def _children(pid: int) -> set[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    found = {int(p) for p in out.split()}
    for child in list(found):
        found |= _children(child)
    return found


def _listening(pids: set[int]) -> list[str]:
    """Local addresses that these processes listen on (``ss -ltnp``)."""
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    addresses = []
    for line in out.splitlines():
        owners = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        if owners & pids:
            addresses.append(line.split()[3])
    return addresses


def _loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    return (
        host.startswith("127.")
        or host in ("::1", "::ffff:127.0.0.1")
        or (host.startswith("::ffff:127."))
    )


@pytest.mark.multiprocess
@pytest.mark.slow
def test_local_run_listens_on_loopback_only(tmp_path):
    launcher = subprocess.Popen(
        [
            str(REPO / "launch" / "local.sh"),
            "2",
            "--",
            "--config=configs/tiny_llama.py",
            f"--workdir={tmp_path / 'run'}",
            "--config.train.steps=400",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 180
        # Process 0's coordination service and each process's collectives sockets.
        while time.monotonic() < deadline and len(set(seen)) < 3:
            seen += _listening(_children(launcher.pid))
            if launcher.poll() is not None:
                break
            time.sleep(1)
    finally:
        os.killpg(launcher.pid, signal.SIGTERM)
        launcher.wait(timeout=120)
    assert len(set(seen)) >= 3, (seen, launcher.stdout.read().decode()[-2000:])
    assert all(_loopback(a) for a in seen), seen
