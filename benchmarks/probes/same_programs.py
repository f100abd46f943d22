"""Does a refactoring change what XLA runs? Compile the same workloads from two trees and
compare every optimised HLO module, with source locations stripped.

    python -m benchmarks.probes.same_programs --base=REV [--configs=tiny_llama,tiny_t5]

For each config, each tree (the commit ``REV`` and the working tree) trains two steps,
exports, and evaluates 8 examples per split under every condition (16 new tokens), with XLA dumping each
compiled module (``--xla_dump_to``). Identical modules mean identical programs: the train
step, the eval step, decoding and gist compression cannot be faster or slower, so a
refactoring that passes this needs no timing. Different modules are listed by name.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parents[2]
LOCATION_TABLES = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")


def export_tree(rev: str | None, out: pathlib.Path) -> pathlib.Path:
    """``rev`` (None: the working tree, tracked and untracked files) copied into ``out``."""
    out.mkdir(parents=True)
    if rev is None:
        files = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()
        for name in files:
            if (REPO / name).is_file():
                (out / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / name, out / name)
    else:
        archive = subprocess.run(["git", "archive", rev], cwd=REPO, check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True)
    return out


def dump_programs(tree: pathlib.Path, config: str, work: pathlib.Path) -> pathlib.Path:
    """Run the workloads from ``tree`` with XLA dumping; the dump directory."""
    dump = work / "dump"
    env = {
        **os.environ,
        "PYTHONPATH": str(tree),
        "XLA_FLAGS": f"--xla_dump_to={dump} --xla_dump_hlo_as_text",
    }
    common = [f"--config=configs/{config}.py", f"--workdir={work / 'run'}"]
    runs = [
        ["gist_jax.train", *common, "--config.train.steps=2", "--config.train.eval_every=0"],
        ["gist_jax.evaluate", *common, "--num_examples=8", "--max_new_tokens=16"],
    ]
    for args in runs:
        result = subprocess.run(
            [sys.executable, "-m", *args], cwd=tree, env=env, capture_output=True, text=True
        )
        if result.returncode:
            raise SystemExit(f"{tree.name}: {' '.join(args[:1])} failed:\n{result.stderr[-3000:]}")
    return dump


def program_text(hlo: str) -> str:
    """The computations of an HLO dump without the source-location tables and metadata."""
    kept, in_tables = [], False
    for line in hlo.splitlines():
        if line in LOCATION_TABLES:
            in_tables = True
            continue
        if line.startswith(("ENTRY", "%", "}")):
            in_tables = False
        if not in_tables and not line.startswith("HloModule"):
            kept.append(re.sub(r", metadata=\{[^}]*\}", "", line))
    return "\n".join(kept)


def fingerprints(dump: pathlib.Path) -> dict[str, list[str]]:
    """Module name -> sorted digests of its optimised programs."""
    out: dict[str, list[str]] = collections.defaultdict(list)
    for path in dump.glob("*after_optimizations.txt"):
        name = re.sub(r"^module_\d+\.", "", path.name).removesuffix(".txt")
        out[name].append(hashlib.sha256(program_text(path.read_text()).encode()).hexdigest())
    return {k: sorted(v) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="git revision to compare against")
    parser.add_argument("--configs", default="tiny_llama,tiny_t5")
    args = parser.parse_args()
    differ = 0
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        trees = {
            "base": export_tree(args.base, root / "base"),
            "new": export_tree(None, root / "new"),
        }
        for config in args.configs.split(","):
            prints = {
                name: fingerprints(dump_programs(tree, config, root / f"{name}_{config}"))
                for name, tree in trees.items()
            }
            base, new = prints["base"], prints["new"]
            same = [k for k in base if base[k] == new.get(k)]
            total = sum(map(len, base.values()))
            print(
                f"{config}: {total} programs under {len(base)} names ({args.base}), "
                f"{sum(map(len, new.values()))} under {len(new)} (working tree); "
                f"identical: {len(same)} of {len(set(base) | set(new))} names"
            )
            for k in sorted(set(base) | set(new)):
                if base.get(k) != new.get(k):
                    differ += 1
                    print(f"  differs: {k}")
    raise SystemExit(1 if differ else 0)


if __name__ == "__main__":
    main()
