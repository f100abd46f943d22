"""Efficiency and throughput measurements of gist_jax, side by side with PyTorch ``transformers``.

Run ``python -m benchmarks`` (from the checkout's root). One module per
measurement: ``peak`` (measured matmul throughput and memory bandwidth of this machine),
``train_bench`` (the real jitted train step vs the same step in PyTorch), ``decode_bench``
(greedy decoding with ``gist_jax.inference.decode`` vs ``transformers`` ``generate``),
``gist_efficiency`` (the paper's caching table: FLOPs, latency, cache bytes), ``scaling``
(train step vs sequence length and batch size; packing vs padding); ``common`` holds the
timing, model loading and machine description they share, ``report`` the tables, JSON and
plot.
"""
