"""One training step in each framework, ready to be timed.

``JaxTrainer`` runs the project's real step: ``gist_jax.train.step.step_function`` with
the optimizer of ``gist_jax.train.optim`` (global-norm clipping + AdamW), jitted with the state
donated as ``gist_jax.train`` does, on one device. ``TorchTrainer`` is the same step
written the ordinary way for ``transformers``: forward with the same 4D gist mask (as
HF's additive float mask, built by ``gist_jax.gist`` from the same batch), token cross
entropy averaged over ``loss_mask``, ``backward``, ``clip_grad_norm_``, ``torch.optim.AdamW``
(same hyper-parameters). Each trainer owns a private copy of the weights, so training
does not move the weights other measurements use. The gist_jax step runs the output
layer only on chunks that hold loss tokens (``gist_jax.train.output_loss``, the train config's
default); ``transformers`` computes logits for every position, as its models do.

Both also expose the forward pass alone (loss) and forward + backward (loss and
gradients, no update), which split a step's time into forward, backward and optimizer.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import BenchModel, timed
from gist_jax import gist
from gist_jax.models import llama
from gist_jax.models.family import LLAMA
from gist_jax.train import freezing, optim, output_loss
from gist_jax.train import step as train_step
from gist_jax.train.state import TrainState

LR = 1e-5
CLIP_NORM = 1.0
CONDITION = "gist"


class JaxTrainer:
    """The jitted gist_jax train step over fixed batches (one executable per batch shape,
    compiled up front: ``compile_s`` is the total compile time)."""

    def __init__(
        self,
        model: BenchModel,
        batches: Sequence[Mapping[str, np.ndarray]],
        parts: bool = False,
        loss_chunk: int = output_loss.DEFAULT_CHUNK,
        frozen_layers: int = 0,
    ):
        """``frozen_layers``: train.frozen_layers (``gist_jax.train.freezing``); needs an unrolled
        model (``model.with_runtime(scan_layers=False)``)."""
        cfg = model.config
        self.config = cfg
        module = llama.build_model(cfg)
        axes = LLAMA.param_axes(cfg)
        schedule = optim.make_schedule(LR, 1_000_000, "constant")
        optimizer = optim.make_optimizer(schedule, axes, weight_decay=0.0, clip_norm=CLIP_NORM)
        params = jax.tree.map(jnp.copy, model.params)  # donated by the step: keep a copy
        frozen = freezing.frozen_modules(params.keys(), frozen_layers)
        optimizer = freezing.restrict_optimizer(optimizer, params, frozen)
        self.state = TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=optimizer.init(params),
            rng=jax.random.key_data(jax.random.key(0)),
        )
        keys = LLAMA.batch_keys
        self.batches = [{k: jnp.asarray(b[k]) for k in keys} for b in batches]
        step = jax.jit(
            train_step.step_function(
                module,
                LLAMA,
                optimizer,
                schedule,
                CONDITION,
                loss_chunk=loss_chunk,
                frozen=frozen,
            ),
            donate_argnums=(0,),
        )
        self.executables: dict[tuple[int, ...], Any] = {}
        self.compile_s = 0.0
        for b in self.batches:
            shape = b["input_ids"].shape
            if shape not in self.executables:
                self.executables[shape], seconds = timed(
                    lambda b=b: step.lower(self.state, b).compile()
                )
                self.compile_s += seconds
        self.batch = self.batches[0]
        self.cost = _cost(self.executables[self.batch["input_ids"].shape])
        self.loss_fn = self.grad_fn = None
        self.parts_compile_s: dict[str, float] = {}
        if parts:

            def loss(params: Any, b: Any) -> jax.Array:
                total, count = train_step.loss_sums(module, LLAMA, params, b, CONDITION, loss_chunk)
                return total / jnp.maximum(count, 1.0)

            self.loss_fn, self.parts_compile_s["forward"] = timed(
                lambda: jax.jit(loss).lower(self.state.params, self.batch).compile()
            )
            self.grad_fn, self.parts_compile_s["forward_backward"] = timed(
                lambda: (
                    jax.jit(jax.value_and_grad(loss)).lower(self.state.params, self.batch).compile()
                )
            )

    def step(self, index: int = 0) -> float:
        batch = self.batches[index]
        self.state, metrics = self.executables[batch["input_ids"].shape](self.state, batch)
        return float(metrics["loss"])

    def epoch(self) -> float:
        """One step on every batch in turn."""
        return sum(self.step(i) for i in range(len(self.batches)))

    def forward(self) -> float:
        return float(self.loss_fn(self.state.params, self.batch))

    def forward_backward(self) -> float:
        loss, grads = self.grad_fn(self.state.params, self.batch)
        jax.block_until_ready(grads)
        return float(loss)


def _cost(compiled: Any) -> dict[str, float]:
    """XLA's own FLOP / byte estimate of a compiled computation."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # older jax returned one dict per device
        analysis = analysis[0] if analysis else {}
    analysis = analysis or {}
    return {k: float(analysis[k]) for k in ("flops", "bytes accessed") if k in analysis}


def torch_additive_mask(batch: Mapping[str, np.ndarray]) -> np.ndarray:
    """The train step's gist mask as HF's additive float mask ``[B, 1, L, L]`` (0 = attend,
    float32 min = masked: finite, so fully masked padding rows stay finite)."""
    pos, seg = batch["positions"], batch["segment_ids"]
    mask = gist.decoder_self_mask(
        pos, pos, batch["gist_first"], batch["gist_last"], CONDITION, seg, seg
    )
    return np.where(np.asarray(mask), 0.0, np.finfo(np.float32).min).astype(np.float32)


class TorchTrainer:
    """The same step in PyTorch ``transformers`` (see the module docstring)."""

    def __init__(
        self,
        model: BenchModel,
        batches: Sequence[Mapping[str, np.ndarray]],
        device: str = "cpu",
        bf16_autocast: bool = False,
    ):
        """``device``: where the step runs ("cuda" on a GPU); ``bf16_autocast``: float32
        weights with bfloat16 compute (``torch.autocast``), as gist_jax's ``dtype`` does."""
        import torch

        self.torch = torch
        self.device = device
        self.autocast = bf16_autocast
        mask_dtype = torch.bfloat16 if bf16_autocast else torch.float32
        self.model = copy.deepcopy(model.torch_model()).to(device).train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0
        )
        self.batches = [
            {
                "input_ids": torch.as_tensor(b["input_ids"], dtype=torch.long),
                "position_ids": torch.as_tensor(np.maximum(b["positions"], 0), dtype=torch.long),
                "attention_mask": torch.as_tensor(torch_additive_mask(b)).to(mask_dtype),
                "targets": torch.as_tensor(b["targets"], dtype=torch.long).reshape(-1),
                "weights": torch.as_tensor(b["loss_mask"], dtype=torch.float32).reshape(-1),
            }
            for b in batches
        ]
        self.batches = [{k: v.to(device) for k, v in b.items()} for b in self.batches]

    def _loss(self, index: int) -> Any:
        b = self.batches[index]
        with self.torch.autocast(self.device, self.torch.bfloat16, enabled=self.autocast):
            logits = self.model(
                input_ids=b["input_ids"],
                position_ids=b["position_ids"],
                attention_mask=b["attention_mask"],
            ).logits
        ce = self.torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), b["targets"], reduction="none"
        )
        return (ce * b["weights"]).sum() / b["weights"].sum().clamp(min=1.0)

    def step(self, index: int = 0) -> float:
        loss = self._loss(index)
        loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.params, CLIP_NORM)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def epoch(self) -> float:
        return sum(self.step(i) for i in range(len(self.batches)))

    def forward(self) -> float:
        with self.torch.no_grad():
            return self._loss(0).item()

    def forward_backward(self) -> float:
        loss = self._loss(0)
        loss.backward()
        for p in self.params:
            p.grad = None
        return loss.item()
