"""What both model families share: the RMS norm (LLaMA's RMSNorm and T5's LayerNorm are
the same computation), the untied output layer, rematerialisation of a layer class, the
config methods for the runtime fields and gist_jax's JSON form (``model_config.json``), and
the two layouts of a layer stack (unrolled ``layers_{i}``, or one ``layers`` tree with a
leading layer axis for ``nn.scan``).

Every parameter carries logical axis names (``gist_jax.sharding`` maps them to the mesh);
statistics and logits are float32 whatever the compute dtype, as in Hugging Face.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from gist_jax.models.attention import IMPLEMENTATIONS

REMAT_POLICIES = ("none", "full", "dots")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RuntimeFields:
    """The fields of a family config that say how the model runs here, not what network it
    is: stored in model_config.json (the params layout follows ``scan_layers``), never
    written to HF, and free to differ between a teacher and its student."""

    dtype: str = "float32"  # compute dtype (DTYPES); params stay float32
    scan_layers: bool = False  # nn.scan over layers
    remat: str = "none"  # REMAT_POLICIES
    attention: str = "cpu"  # attention.IMPLEMENTATIONS


RUNTIME_FIELDS = tuple(f.name for f in dataclasses.fields(RuntimeFields))


class ConfigMethods:
    """Mixed into each family's frozen dataclass config, which has the family tag
    ``model_type`` (its class default) and the ``RUNTIME_FIELDS``."""

    model_type: str
    dtype: str
    remat: str
    attention: str

    def check_common_fields(self) -> None:
        if self.model_type != type(self).model_type:
            raise ValueError(f"{type(self).__name__} got model_type {self.model_type!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {DTYPES}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat {self.remat!r} is not one of {REMAT_POLICIES}")
        if self.attention not in IMPLEMENTATIONS:
            raise ValueError(f"attention {self.attention!r} is not one of {IMPLEMENTATIONS}")

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Any:
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}")
        return cls(**dict(d))


class RMSNorm(nn.Module):
    """Root-mean-square norm (no mean, no bias), statistics in float32, learned ``scale``."""

    epsilon: float
    dtype: Any  # the compute dtype of the output

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
            (x.shape[-1],),
            jnp.float32,
        )
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.epsilon)
        return xf.astype(self.dtype) * scale.astype(self.dtype)


class Unembed(nn.Module):
    """Untied output layer ``[D, V]``, normal(``init_std``) initialised; float32 logits."""

    vocab_size: int
    init_std: float
    dtype: Any

    @nn.compact
    def __call__(self, hidden: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.normal(self.init_std), ("embed", "vocab")),
            (hidden.shape[-1], self.vocab_size),
            jnp.float32,
        )
        return jnp.einsum(
            "bqd,dv->bqv", hidden, kernel.astype(self.dtype), preferred_element_type=jnp.float32
        )


def remat(layer_cls: type[nn.Module], policy: str, scan_layers: bool) -> type[nn.Module]:
    """``layer_cls`` rematerialised under ``policy`` ("none", "full" or "dots")."""
    if policy == "none":
        return layer_cls
    # "dots" keeps the outputs of weight matmuls (projections, MLP) and recomputes the rest,
    # including the O(L^2) attention scores (and T5's position bias), which dominate
    # activation memory. Under scan, CSE across iterations cannot happen, so prevent_cse
    # (which blocks some XLA optimisations) is only needed for the unrolled stack.
    saveable = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
    return nn.remat(layer_cls, policy=saveable[policy], prevent_cse=not scan_layers)


def stack_layers(params: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    """Unrolled params (``layers_0`` ... ``layers_{L-1}``) -> scanned layout (``layers``)."""
    out = {k: v for k, v in params.items() if not k.startswith("layers_")}
    per_layer = [params[f"layers_{i}"] for i in range(num_layers)]
    out["layers"] = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *per_layer)
    return out


def unstack_layers(params: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    """Scanned params (``layers`` with a leading [L] axis) -> unrolled layout."""
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(num_layers):
        out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
    return out
