"""The on-disk gist cache store: bit-exact round trip (LLaMA and T5), generation from a
stored cache equals generation from a fresh compression, stores of other models are
rejected, fingerprints ignore layout and sharding, writes are atomic, only missing prompts
are compressed, and the bytes per prompt follow the formula."""

from __future__ import annotations

import dataclasses

import fixtures_llama as fxl
import fixtures_t5 as fxt
import jax
import numpy as np
import pytest
from fixtures_gist import BATCH, MAX_NEW, K, llama_model, make_examples, t5_model

from gist_jax import sharding
from gist_jax.inference import decode, gist_cache
from gist_jax.inference import store as gist_store
from gist_jax.inference.store import GistStore, StoreError, StoreMismatchError
from gist_jax.models import llama
from gist_jax.models.family import family_of


def _llama_prompts() -> tuple[list[list[int]], list[list[int]], list[int]]:
    split = gist_cache.dedupe_prompts(make_examples(fxl.GIST_ID, []), fxl.GIST_ID)
    return split.prompts, split.inputs, split.rows


def _assert_same_cache(a: gist_cache.GistCache, b: gist_cache.GistCache) -> None:
    a, b = a.to_numpy(), b.to_numpy()
    for name in ("k", "v", "positions", "hidden"):
        x, y = getattr(a, name), getattr(b, name)
        if x is None:
            assert y is None
            continue
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes(), name  # bit-exact


@pytest.fixture(scope="module")
def llama_store(tmp_path_factory):
    config, params = llama_model()
    prompts, _, _ = _llama_prompts()
    store = GistStore.open(tmp_path_factory.mktemp("store") / "gists", config, params, num_gist=K)
    fresh = gist_cache.compress(config, params, prompts, batch_size=BATCH)
    keys = store.put(fresh, prompts, texts=[f"prompt {i}" for i in range(len(prompts))])
    return store, keys, fresh


def test_llama_round_trip_is_bit_exact(llama_store):
    store, keys, fresh = llama_store
    assert len(set(keys)) == len(keys) and store.keys() == sorted(keys)
    _assert_same_cache(store.get(keys), fresh)
    # Any subset, any order, repeats.
    rows = [3, 0, 3]
    _assert_same_cache(store.get([keys[r] for r in rows]), fresh.take(rows))
    meta = store.meta(keys[2])
    assert meta["token_ids"] == _llama_prompts()[0][2] and meta["text"] == "prompt 2"
    # Nothing temporary is left behind.
    assert not [
        p for p in (store.path / gist_store.PROMPTS_DIR).iterdir() if p.name.startswith(".")
    ]


def test_generation_from_store_equals_fresh_compression(llama_store):
    config, params = llama_model()
    store, keys, fresh = llama_store
    _, inputs, rows = _llama_prompts()
    reopened = GistStore.open(store.path, config, params)
    kwargs = dict(max_new_tokens=MAX_NEW, batch_size=BATCH, return_logits=True, eos_token_ids=[])
    from_disk = gist_cache.generate(
        config, params, reopened.get([keys[r] for r in rows]), inputs, **kwargs
    )
    from_fresh = gist_cache.generate(config, params, fresh.take(rows), inputs, **kwargs)
    for a, b in zip(from_disk, from_fresh, strict=True):
        assert a.tokens == b.tokens
        np.testing.assert_array_equal(a.logits, b.logits)


def test_bytes_per_prompt(llama_store):
    config, _ = llama_model()
    store, keys, fresh = llama_store
    # k * layers * 2 * kv_heads * head_dim * 4 bytes (float32)
    expected = K * config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * 4
    assert store.bytes_per_prompt() == expected == fresh.nbytes_per_prompt()
    prompt_len = len(_llama_prompts()[0][3])
    assert family_of(config).cache_bytes(config, prompt_len) == expected * prompt_len / K
    assert store.disk_bytes(keys[0]) > 0


def test_t5_round_trip_and_generation(tmp_path):
    config, params = t5_model()
    split = gist_cache.dedupe_prompts(make_examples(fxt.GIST_ID, [fxt.EOS_ID]), fxt.GIST_ID)
    store = GistStore.open(tmp_path / "t5", config, params, num_gist=K)
    keys = store.add(config, params, split.prompts, batch_size=BATCH)
    fresh = gist_cache.compress(config, params, split.prompts, batch_size=BATCH)
    loaded = store.get(keys)
    assert loaded.hidden is not None
    _assert_same_cache(loaded, fresh)
    kwargs = dict(max_new_tokens=MAX_NEW, batch_size=BATCH, eos_token_ids=[])
    a = gist_cache.generate(config, params, loaded.take(split.rows), split.inputs, **kwargs)
    b = gist_cache.generate(config, params, fresh.take(split.rows), split.inputs, **kwargs)
    assert [x.tokens for x in a] == [y.tokens for y in b]
    assert store.bytes_per_prompt() == fresh.nbytes_per_prompt()


def test_store_of_another_model_is_rejected(llama_store):
    config, params = llama_model()
    store, _, _ = llama_store
    # One parameter changed by one ulp.
    bumped = jax.tree.map(lambda x: x, params)
    kernel = np.array(bumped["lm_head"]["kernel"])
    kernel[3, 5] = np.nextafter(kernel[3, 5], np.float32(np.inf))
    bumped["lm_head"]["kernel"] = kernel
    with pytest.raises(StoreMismatchError, match="parameters differ"):
        GistStore.open(store.path, config, bumped)
    other = dataclasses.replace(config, rms_norm_eps=1e-6)
    with pytest.raises(StoreMismatchError, match=r"config fields differ: \['rms_norm_eps'\]"):
        GistStore.open(store.path, other, params)
    with pytest.raises(StoreMismatchError, match="2 gist tokens, asked for 1"):
        GistStore.open(store.path, config, params, num_gist=1)
    t5_config, t5_params = t5_model()
    with pytest.raises(StoreMismatchError):
        GistStore.open(store.path, t5_config, t5_params)
    # Keys depend on the model as well as on the prompt.
    prompt = _llama_prompts()[0][0]
    assert gist_store.prompt_key("a" * 64, prompt) != gist_store.prompt_key("b" * 64, prompt)


def test_fingerprint_ignores_layout_and_sharding():
    config, params = llama_model()
    base = gist_store.model_fingerprint(config, params)
    scanned = llama.relayout_params(params, config, True)
    assert (
        gist_store.model_fingerprint(dataclasses.replace(config, scan_layers=True), scanned) == base
    )
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})

    placed = decode.place_params(params, config, mesh)
    assert gist_store.model_fingerprint(config, placed) == base
    assert (
        gist_store.model_fingerprint(dataclasses.replace(config, dtype="bfloat16"), params) != base
    )


def test_writes_are_atomic_and_only_missing_prompts_are_compressed(tmp_path, monkeypatch):
    config, params = llama_model()
    prompts, _, _ = _llama_prompts()
    store = GistStore.open(tmp_path / "s", config, params, num_gist=K)
    cache = gist_cache.compress(config, params, prompts[:2], batch_size=BATCH)

    def broken(path, array):
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(gist_store, "_write_array", broken)
        with pytest.raises(OSError, match="disk full"):
            store.put(cache, prompts[:2])
    assert store.keys() == []
    assert list((tmp_path / "s" / gist_store.PROMPTS_DIR).iterdir()) == []

    store.put(cache, prompts[:2])
    compressed: list[int] = []
    real = gist_cache.compress

    def counting(config, params, rows, **kwargs):
        compressed.append(len(rows))
        return real(config, params, rows, **kwargs)

    monkeypatch.setattr(gist_cache, "compress", counting)
    keys = store.add(config, params, prompts, batch_size=BATCH)
    assert compressed == [len(prompts) - 2]
    assert store.keys() == sorted(keys)


def test_bad_store_paths(tmp_path):
    config, params = llama_model()
    with pytest.raises(StoreError, match="not a gist store"):
        GistStore.read(tmp_path)
    with pytest.raises(StoreError, match="num_gist is needed"):
        GistStore.open(tmp_path / "new", config, params)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file.txt").write_text("x")
    with pytest.raises(StoreError, match="is not empty and is not a gist store"):
        GistStore.open(tmp_path / "busy", config, params, num_gist=K)
    store = GistStore.open(tmp_path / "ok", config, params, num_gist=K)
    with pytest.raises(KeyError, match="no cached prompt"):
        store.get(["0" * 32])
    with pytest.raises(StoreError, match="not a prompt key"):
        store.get(["../etc"])
