"""The device check's ``--smoke`` mode: the script an accelerator machine runs
(``benchmarks/device_check.py``), run end to end on this CPU with a tiny model."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_device_check_smoke_runs_every_section(tmp_path):
    out = tmp_path / "device_check.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.device_check", "--smoke", f"--out={out}"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["tests"]["ok"], result["tests"]
    # No cuDNN on a CPU; "flash" runs in Pallas interpret mode.
    assert result["implementations"] == ["reference", "cpu", "flash"]
    rows = result["train"]["rows"]
    assert set(rows) == {
        "gist_jax reference",
        "gist_jax cpu",
        "gist_jax flash",
        "gist_jax reference, 8 packed per row",
        "gist_jax flash, 8 packed per row",
        "transformers sdpa",
    }
    assert all(r["tokens_per_s"] > 0 and r["mfu"] > 0 for r in rows.values())
    for batch in ("1", "4"):
        rates = result["decode"][batch]
        assert set(rates) == {"gist_jax", "gist_jax from gist cache", "transformers generate"}
        assert all(rate > 0 for rate in rates.values())
    memory = result["memory_bytes"]
    impls = ("reference", "cpu", "flash")
    assert set(memory) == {f"{i} {n}" for i in impls for n in (64, 128, 256)}
    # A forward + backward plans more memory for longer rows; "flash" grows less (no L x L
    # tensors), so it plans less than "reference" at the longest.
    assert memory["reference 64"] < memory["reference 128"] < memory["reference 256"]
    assert memory["flash 256"] < memory["reference 256"]
    assert "| train step |" in proc.stdout and "| forward + backward |" in proc.stdout
