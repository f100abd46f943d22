"""A persistent store of gist caches on disk (tensorstore, zarr), keyed by prompt and model.

This module owns compressing a set of prompts once and saving each prompt's gist cache,
so that later generation reads k tokens of keys/values per prompt instead of re-running
the prompt. Layout::

    STORE/
      store.json              format, model fingerprint, model type and config, k, dtype
      prompts/<key>/          one directory per prompt, renamed into place when complete
        meta.json             token ids of the prompt (and optional text), k, positions
        k/ v/                 zarr arrays [layers, k, KVH, D] (LLaMA: rotated keys)
        hidden/               zarr array [k, d_model] (T5 only)

``key`` is a hash of the model fingerprint and the prompt's token ids, so the same
instruction compressed by another model never collides. The *model fingerprint* hashes the
model config (without the runtime-only ``scan_layers`` / ``remat``, which do not change
numbers) and a checksum of every parameter's bits computed on device with wrapping
uint32 arithmetic (order independent, so the same params give the same fingerprint on any
mesh or layout). Opening a store with a different model raises ``StoreMismatchError``.

Writes are atomic: a prompt is written under a temporary name in ``prompts/`` and renamed,
and ``store.json`` likewise, so a crash leaves no half-written entry that looks complete.
In a multi-process run every process computes the caches (sharded) and process 0 writes.
Arrays are stored in the cache dtype and round-trip bit-exactly.

Bytes per prompt: ``k * layers * 2 * kv_heads * head_dim * itemsize`` (+ ``k * d_model *
itemsize`` of hidden states for T5), versus the prompt length instead of ``k`` for an
ordinary prompt cache; see ``Family.cache_bytes`` (``gist_jax.models.family``).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gist_jax.files import atomic_write_text
from gist_jax.inference import gist_cache
from gist_jax.inference.gist_cache import GistCache
from gist_jax.models.family import config_from_dict, family_named, family_of

FORMAT = "gist_jax.inference.store/2"  # 2: caches in attention.KVCache's layout
STORE_FILE = "store.json"
PROMPTS_DIR = "prompts"
# Config fields that change how a model runs, not what it computes.
NON_NUMERIC_FIELDS = ("scan_layers", "remat", "attention")


class StoreError(ValueError):
    """A store that cannot be used; the message names the path and the cause."""


class StoreMismatchError(StoreError):
    """A store written by a different model (or with a different k / dtype)."""


# ---------------------------------------------------------------------------------------
# Fingerprints


def _mix32(h: jax.Array) -> jax.Array:
    # MurmurHash3's finaliser: every input bit affects every output bit.
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """Two uint32 sums of mixed (bits, index) pairs: exact, and independent of how the
    reduction is ordered or sharded (integer addition wraps and commutes)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    index = jnp.zeros(x.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(x.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * jnp.uint32(stride)
        stride = (stride * x.shape[axis]) & 0xFFFFFFFF
    h = _mix32(bits ^ _mix32(index * jnp.uint32(0x9E3779B1) + jnp.uint32(1)))
    return jnp.stack([jnp.sum(h, dtype=jnp.uint32), jnp.sum(_mix32(h + bits), dtype=jnp.uint32)])


_tree_checksums = jax.jit(lambda tree: jax.tree.map(_leaf_checksum, tree))


def params_fingerprint(params: Any, config: Any) -> str:
    """Hex digest of the parameters' exact bits, the same for scanned and unrolled layouts
    and for any sharding."""
    if config.scan_layers:
        params = family_of(config).relayout_params(params, config, False)
    sums = jax.device_get(_tree_checksums(params))
    digest = hashlib.sha256()
    for path, leaf in sorted(
        jax.tree_util.tree_flatten_with_path(sums)[0],
        key=lambda item: jax.tree_util.keystr(item[0]),
    ):
        digest.update(jax.tree_util.keystr(path).encode())
        digest.update(np.asarray(leaf, np.uint32).tobytes())
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        digest.update(f"{jax.tree_util.keystr(path)}{tuple(leaf.shape)}".encode())
    return digest.hexdigest()


def config_fingerprint_dict(config: Any) -> dict[str, Any]:
    d = dict(config.to_dict())
    for name in NON_NUMERIC_FIELDS:
        d.pop(name, None)
    return d


def model_fingerprint(config: Any, params: Any) -> str:
    """Hash of the model config (numeric fields) and the params fingerprint."""
    digest = hashlib.sha256()
    digest.update(json.dumps(config_fingerprint_dict(config), sort_keys=True).encode())
    digest.update(params_fingerprint(params, config).encode())
    return digest.hexdigest()


def prompt_key(fingerprint: str, token_ids: Sequence[int]) -> str:
    """The store key of a prompt under a model: 32 hex digits."""
    digest = hashlib.sha256(fingerprint.encode())
    digest.update(np.asarray([int(t) for t in token_ids], np.int64).tobytes())
    return digest.hexdigest()[:32]


# ---------------------------------------------------------------------------------------
# tensorstore I/O


def _spec(path: pathlib.Path) -> dict[str, Any]:
    return {"driver": "zarr", "kvstore": {"driver": "file", "path": str(path)}}


def _write_array(path: pathlib.Path, array: np.ndarray) -> Any:
    import tensorstore as ts

    store = ts.open(
        _spec(path), create=True, dtype=ts.dtype(array.dtype.name), shape=array.shape
    ).result()
    return store.write(array)


def _read_array(path: pathlib.Path) -> Any:
    import tensorstore as ts

    return ts.open(_spec(path), open=True).result().read()


# ---------------------------------------------------------------------------------------
# The store


@dataclasses.dataclass(frozen=True)
class StoreInfo:
    """What ``store.json`` records."""

    fingerprint: str
    model_type: str
    model_config: dict[str, Any]
    num_gist: int
    dtype: str
    format: str = FORMAT

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class GistStore:
    """A directory of gist caches for one model (see the module docstring).

    Use ``GistStore.open(path, config, params)``; it creates the store if needed and
    raises ``StoreMismatchError`` when ``path`` holds caches of another model.
    """

    def __init__(self, path: str | os.PathLike, info: StoreInfo):
        self.path = pathlib.Path(path)
        self.info = info

    # ---- opening ----

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        config: Any,
        params: Any,
        num_gist: int | None = None,
        create: bool = True,
        fingerprint: str | None = None,
    ) -> GistStore:
        """Open (or create) the store at ``path`` for this model.

        ``num_gist`` is required to create a store; an existing store must agree with it
        when given. ``fingerprint`` skips recomputing ``model_fingerprint(config, params)``.
        """
        path = pathlib.Path(path)
        fingerprint = fingerprint or model_fingerprint(config, params)
        meta_path = path / STORE_FILE
        if meta_path.is_file():
            store = cls.read(path)
            store.check_model(config, fingerprint, num_gist)
            return store
        if not create:
            raise StoreError(f"{path}: no {STORE_FILE} (not a gist store)")
        if num_gist is None:
            raise StoreError(f"{path}: num_gist is needed to create a new store")
        if path.exists() and any(path.iterdir()):
            raise StoreError(f"{path} exists, is not empty and is not a gist store")
        info = StoreInfo(
            fingerprint=fingerprint,
            model_type=config.model_type,
            model_config=config.to_dict(),
            num_gist=int(num_gist),
            dtype=jnp.dtype(config.compute_dtype).name,
        )
        (path / PROMPTS_DIR).mkdir(parents=True, exist_ok=True)
        atomic_write_text(meta_path, json.dumps(info.to_dict(), indent=2) + "\n")
        return cls(path, info)

    @classmethod
    def read(cls, path: str | os.PathLike) -> GistStore:
        """Open an existing store without a model (listing, reading raw caches)."""
        path = pathlib.Path(path)
        meta_path = path / STORE_FILE
        if not meta_path.is_file():
            raise StoreError(f"{path}: no {STORE_FILE} (not a gist store)")
        try:
            raw = json.loads(meta_path.read_text())
            info = StoreInfo(**raw)
        except (json.JSONDecodeError, TypeError) as err:
            raise StoreError(f"{meta_path}: not a valid store description ({err})") from err
        if info.format != FORMAT:
            raise StoreError(f"{meta_path}: format {info.format!r}, expected {FORMAT!r}")
        return cls(path, info)

    def check_model(self, config: Any, fingerprint: str, num_gist: int | None = None) -> None:
        """Raise ``StoreMismatchError`` unless this store was written by this model."""
        info = self.info
        if fingerprint != info.fingerprint:
            stored = info.model_config
            changed = sorted(
                k
                for k, v in config_fingerprint_dict(config).items()
                if stored.get(k) != v and k not in NON_NUMERIC_FIELDS
            )
            detail = f"config fields differ: {changed}" if changed else "parameters differ"
            raise StoreMismatchError(
                f"{self.path}: gist store was written by a different model ({detail}; "
                f"store fingerprint {info.fingerprint[:12]}, model {fingerprint[:12]})"
            )
        if num_gist is not None and int(num_gist) != info.num_gist:
            raise StoreMismatchError(
                f"{self.path}: store holds caches of {info.num_gist} gist tokens, asked for "
                f"{num_gist}"
            )

    # ---- keys ----

    def key(self, token_ids: Sequence[int]) -> str:
        return prompt_key(self.info.fingerprint, token_ids)

    def _dir(self, key: str) -> pathlib.Path:
        if not key or any(c not in "0123456789abcdef" for c in key):
            raise StoreError(f"{key!r} is not a prompt key (hex digits)")
        return self.path / PROMPTS_DIR / key

    def __contains__(self, key: str) -> bool:
        return (self._dir(key) / "meta.json").is_file()

    def keys(self) -> list[str]:
        root = self.path / PROMPTS_DIR
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if (p / "meta.json").is_file())

    def meta(self, key: str) -> dict[str, Any]:
        path = self._dir(key) / "meta.json"
        if not path.is_file():
            raise KeyError(f"{self.path}: no cached prompt {key}")
        return json.loads(path.read_text())

    # ---- writing ----

    def put(
        self, cache: GistCache, prompts: Sequence[Sequence[int]], texts: Sequence[str] | None = None
    ) -> list[str]:
        """Save row ``i`` of ``cache`` as the cache of ``prompts[i]``; returns the keys.
        Entries that exist already are kept (same key = same prompt and model)."""
        cache = cache.to_numpy()
        if cache.batch_size != len(prompts):
            raise StoreError(f"{len(prompts)} prompts for a cache of {cache.batch_size} rows")
        if cache.model_type != self.info.model_type or cache.num_gist != self.info.num_gist:
            raise StoreMismatchError(
                f"{self.path}: store holds {self.info.model_type} caches of k="
                f"{self.info.num_gist}; got {cache.model_type} with k={cache.num_gist}"
            )
        if cache.k.dtype.name != self.info.dtype:
            raise StoreMismatchError(
                f"{self.path}: store holds {self.info.dtype} caches, got {cache.k.dtype.name}"
            )
        keys = [self.key(prompt) for prompt in prompts]
        # Every process holds the gathered cache; process 0 writes, the others wait for it.
        if jax.process_index() == 0:
            self._write_rows(cache, prompts, keys, texts)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("gist_jax:gist_store:put")
        return keys

    def _write_rows(
        self,
        cache: GistCache,
        prompts: Sequence[Sequence[int]],
        keys: Sequence[str],
        texts: Sequence[str] | None,
    ) -> None:
        for i, (prompt, key) in enumerate(zip(prompts, keys, strict=True)):
            if key in self:
                continue
            meta = {
                "token_ids": [int(t) for t in prompt],
                "positions": [int(p) for p in cache.positions[i]],
                "num_gist": cache.num_gist,
            }
            if texts is not None:
                meta["text"] = texts[i]
            arrays = {"k": cache.k[:, i], "v": cache.v[:, i]}
            if cache.hidden is not None:
                arrays["hidden"] = cache.hidden[i]
            self._write_entry(key, meta, arrays)

    def _write_entry(self, key: str, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        final = self._dir(key)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=final.parent))
        try:
            futures = [
                _write_array(tmp / name, np.ascontiguousarray(a)) for name, a in arrays.items()
            ]
            for future in futures:
                future.result()
            (tmp / "meta.json").write_text(json.dumps(meta) + "\n")
            try:
                os.rename(tmp, final)
            except OSError:
                # Another writer got there first with the same (deterministic) content.
                if not (final / "meta.json").is_file():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def add(
        self,
        config: Any,
        params: Any,
        prompts: Sequence[Sequence[int]],
        texts: Sequence[str] | None = None,
        batch_size: int | None = None,
        mesh: jax.sharding.Mesh | None = None,
    ) -> list[str]:
        """Compress the prompts not yet in the store, save them, and return every
        prompt's key (in order). The model must be the store's (checked)."""
        self.check_model(config, model_fingerprint(config, params))
        missing = [i for i, p in enumerate(prompts) if self.key(p) not in self]
        if missing:
            cache = gist_cache.compress(
                config, params, [prompts[i] for i in missing], batch_size=batch_size, mesh=mesh
            )
            self.put(
                cache,
                [prompts[i] for i in missing],
                None if texts is None else [texts[i] for i in missing],
            )
        return [self.key(p) for p in prompts]

    # ---- reading ----

    def get(self, keys: Sequence[str]) -> GistCache:
        """The caches of ``keys`` stacked into one ``GistCache`` (host numpy arrays), all
        reads issued concurrently."""
        if not keys:
            raise StoreError("no keys to read")
        missing = [k for k in keys if k not in self]
        if missing:
            raise KeyError(f"{self.path}: no cached prompt(s) {missing[:5]}")
        names = family_named(self.info.model_type).cache_fields
        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            pending = {
                (key, name): pool.submit(lambda p: _read_array(p).result(), self._dir(key) / name)
                for key in dict.fromkeys(keys)
                for name in names
            }
            arrays = {item: future.result() for item, future in pending.items()}
        positions = np.asarray([self.meta(key)["positions"] for key in keys], np.int32)
        return GistCache(
            k=np.stack([arrays[(key, "k")] for key in keys], axis=1),
            v=np.stack([arrays[(key, "v")] for key in keys], axis=1),
            positions=positions,
            hidden=(
                np.stack([arrays[(key, "hidden")] for key in keys], axis=0)
                if "hidden" in names
                else None
            ),
            model_type=self.info.model_type,
        )

    # ---- sizes ----

    def bytes_per_prompt(self) -> int:
        """Raw bytes of one cached prompt (keys, values and T5 hidden states)."""
        config = config_from_dict(self.info.model_config)
        return int(family_of(config).cache_bytes(config, self.info.num_gist))

    def disk_bytes(self, key: str) -> int:
        """Bytes one entry takes on disk (zarr chunks, compressed, plus metadata)."""
        return sum(p.stat().st_size for p in self._dir(key).rglob("*") if p.is_file())
