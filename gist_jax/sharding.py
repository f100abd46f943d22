"""Device mesh, logical axis rules and shardings for params, optimizer state and batches.

This module owns how the model's logical axis names (see the shared contract: "vocab",
"embed", "mlp", "heads", "kv_heads", "head_dim", "layers", "norm", "relpos_buckets"
for params; "batch", "length", ... for activations) land on the physical mesh axes
``("data", "fsdp", "tensor")``:

==============================  ==================
logical axis                    mesh axes
==============================  ==================
batch                           ("data", "fsdp")
embed                           "fsdp"
mlp, heads, kv_heads, vocab     "tensor"
everything else                 replicated
==============================  ==================

``data`` is pure data parallelism (params replicated), ``fsdp`` shards both the batch and
the params' embed dimension (ZeRO-3 style: params are all-gathered per layer in the
forward pass), ``tensor`` is Megatron-style model parallelism over heads / MLP / vocab.
A rule is skipped (the dimension stays replicated) when the dimension's size does not
divide by the mesh axes' product, or when an earlier dimension of the same array already
uses that mesh axis; so e.g. a vocabulary of 49153 (49152 + one ``<GIST>`` row) is simply
not split over ``tensor``. Rules onto axes of size 1 are dropped, which keeps the specs
(and the compiled programs) as simple as the mesh allows.

Multi-slice TPU deployments (``device.slice_index`` differs between devices) get a hybrid
mesh from ``mesh_utils.create_hybrid_device_mesh``: the slices are stacked along the
``data`` axis, so only gradient all-reduces cross the slow data-centre network.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")
BATCH_AXES: tuple[str, ...] = ("data", "fsdp")

# (logical name, mesh axes). Logical names not listed are replicated.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...]], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
)

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]


class MeshError(ValueError):
    """A mesh specification that does not fit the available devices."""


def resolve_mesh_shape(spec: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Mesh axis sizes for ``MESH_AXES`` from ``spec`` (``-1`` = all remaining devices).

    Raises ``MeshError`` naming the axes when they do not multiply to ``num_devices``.
    """
    unknown = sorted(set(spec) - set(MESH_AXES))
    if unknown:
        raise MeshError(f"unknown mesh axes {unknown}; expected {MESH_AXES}")
    sizes = [int(spec.get(axis, 1)) for axis in MESH_AXES]
    described = ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes, strict=True))
    if sum(s == -1 for s in sizes) > 1:
        raise MeshError(f"mesh ({described}): at most one axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise MeshError(f"mesh ({described}): sizes must be positive or -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise MeshError(
                f"mesh ({described}): the fixed axes multiply to {known}, which does not "
                f"divide the {num_devices} devices"
            )
        sizes[sizes.index(-1)] = num_devices // known
    elif known != num_devices:
        raise MeshError(
            f"mesh ({described}) has {known} devices but {num_devices} are available; "
            "set one axis to -1 to use the rest"
        )
    return tuple(sizes)


def _num_slices(devices: Sequence[Any]) -> int:
    return len({getattr(d, "slice_index", 0) for d in devices})


def make_mesh(spec: Mapping[str, int], devices: Sequence[Any] | None = None) -> Mesh:
    """A ``Mesh`` over ``devices`` (default: all global devices) with ``MESH_AXES``.

    With several slices the ``data`` axis must be a multiple of the slice count; the
    slices form its outer part (data-centre network), the rest is within a slice.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(spec, len(devices))
    grid = device_grid(shape, devices)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def device_grid(shape: Sequence[int], devices: Sequence[Any]) -> np.ndarray:
    """The devices arranged as a ``shape`` (data, fsdp, tensor) array: topology-aware for
    all devices, hybrid ICI x DCN across slices, in the given order for a subset."""
    devices = list(devices)
    shape = tuple(shape)
    slices = _num_slices(devices)
    if slices > 1:
        if shape[0] % slices:
            raise MeshError(
                f"{slices} slices: the data axis ({shape[0]}) must be a multiple of the slice "
                "count, since slices are joined along data"
            )
        ici = (shape[0] // slices, shape[1], shape[2])
        dcn = (slices, 1, 1)
        return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    if len(devices) == len(jax.devices()):
        return mesh_utils.create_device_mesh(shape, devices)
    # A subset of the devices (tests, restoring onto a smaller mesh): keep their order.
    return np.asarray(devices, dtype=object).reshape(shape)


def mesh_rules(mesh: Mesh, rules: Rules = LOGICAL_RULES) -> list[tuple[str, Any]]:
    """``rules`` with mesh axes of size 1 removed (a rule left with none maps to None).

    This is the form flax's ``nn.logical_axis_rules`` takes for activation constraints.
    """
    out = []
    for name, axes in rules:
        axes_t = (axes,) if isinstance(axes, str) else tuple(axes or ())
        kept = tuple(a for a in axes_t if mesh.shape[a] > 1)
        out.append((name, kept[0] if len(kept) == 1 else (kept or None)))
    return out


def activation_rules(
    mesh: Mesh, dims: Mapping[str, int], rules: Rules = LOGICAL_RULES
) -> list[tuple[str, Any]]:
    """Rules for activation constraints inside the model, given the sizes the model uses
    for each logical name (``dims``, e.g. ``{"vocab": 49153, "heads": 9}``): a name whose
    size does not divide its mesh axes maps to None (replicated) instead of failing."""
    out = []
    for name, axes in mesh_rules(mesh, rules):
        if axes is not None and name in dims:
            axes_t = (axes,) if isinstance(axes, str) else axes
            if dims[name] % math.prod(mesh.shape[a] for a in axes_t):
                axes = None
        out.append((name, axes))
    return out


def logical_to_spec(
    logical_axes: Sequence[str | None] | None,
    shape: Sequence[int],
    mesh: Mesh,
    rules: Rules = LOGICAL_RULES,
) -> PartitionSpec:
    """The ``PartitionSpec`` of one array from its logical axis names and shape.

    A rule is skipped when the dimension does not divide the product of its mesh axes,
    or when one of those mesh axes is already used by an earlier dimension.
    """
    if logical_axes is None:
        return PartitionSpec()
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    table = dict(mesh_rules(mesh, rules))
    used: set[str] = set()
    spec: list[Any] = []
    for name, size in zip(logical_axes, shape, strict=True):
        axes = table.get(name) if name is not None else None
        axes_t = (axes,) if isinstance(axes, str) else tuple(axes or ())
        if (
            not axes_t
            or used.intersection(axes_t)
            or size % math.prod(mesh.shape[a] for a in axes_t)
        ):
            spec.append(None)
            continue
        used.update(axes_t)
        spec.append(axes_t[0] if len(axes_t) == 1 else axes_t)
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


def _is_axes_leaf(x: Any) -> bool:
    return x is None or (isinstance(x, tuple) and all(isinstance(a, str | None) for a in x))


def tree_shardings(
    abstract_tree: Any, logical_axes: Any, mesh: Mesh, rules: Rules = LOGICAL_RULES
) -> Any:
    """``NamedSharding`` per leaf of ``abstract_tree`` (arrays or ``ShapeDtypeStruct``s) from
    a matching pytree of logical-axis tuples (``param_logical_axes(config)``)."""
    flat_axes, axes_def = jax.tree_util.tree_flatten(logical_axes, is_leaf=_is_axes_leaf)
    flat_abs, abs_def = jax.tree_util.tree_flatten(abstract_tree)
    if len(flat_axes) != len(flat_abs):
        raise ValueError(
            f"logical axes tree has {len(flat_axes)} leaves but the array tree has "
            f"{len(flat_abs)}: {axes_def} vs {abs_def}"
        )
    shardings = [
        NamedSharding(mesh, logical_to_spec(axes, leaf.shape, mesh, rules))
        for axes, leaf in zip(flat_axes, flat_abs, strict=True)
    ]
    return jax.tree_util.tree_unflatten(abs_def, shardings)


def replicated(mesh: Mesh) -> NamedSharding:
    """A fully replicated sharding on ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def batch_spec(mesh: Mesh, ndim: int = 2) -> PartitionSpec:
    """Leading (batch) dimension over the batch mesh axes, the rest replicated."""
    axes = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1)
    lead = axes[0] if len(axes) == 1 else (axes or None)
    return PartitionSpec(lead, *([None] * (ndim - 1)))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """``NamedSharding`` of a ``[B, ...]`` batch array."""
    return NamedSharding(mesh, batch_spec(mesh, ndim))


def batch_parallelism(mesh: Mesh) -> int:
    """How many ways the batch dimension is split (``data * fsdp``)."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def process_batch_rows(mesh: Mesh, global_batch: int) -> tuple[int, int]:
    """``(start, stop)``: the rows of a ``[global_batch, ...]`` batch that this process's
    devices hold. Each process loads exactly these rows; ``make_global_batch`` assembles
    them. Raises if the process's rows are not one contiguous block (an unusual device
    order), since per-host data loading assumes they are."""
    sharding = batch_sharding(mesh, 1)
    index_map = sharding.addressable_devices_indices_map((global_batch,))
    rows: set[int] = set()
    for index in index_map.values():
        rows.update(range(*index[0].indices(global_batch)))
    start, stop = min(rows), max(rows) + 1
    if len(rows) != stop - start:
        raise MeshError(
            f"process {jax.process_index()} holds non-contiguous batch rows {sorted(rows)}; "
            "reorder the mesh devices so each process owns a contiguous block"
        )
    return start, stop


def make_global_batch(local: Mapping[str, np.ndarray], mesh: Mesh, global_batch: int) -> dict:
    """Global ``jax.Array``s from this process's rows (``process_batch_rows``) of a batch."""
    out = {}
    for name, array in local.items():
        array = np.asarray(array)
        global_shape = (global_batch, *array.shape[1:])
        sharding = batch_sharding(mesh, array.ndim)
        out[name] = jax.make_array_from_process_local_data(sharding, array, global_shape)
    return out


def describe(mesh: Mesh) -> str:
    """``data=2 fsdp=4 tensor=1 (8 devices, 2 processes)`` for logs and errors."""
    axes = " ".join(f"{a}={mesh.shape[a]}" for a in MESH_AXES)
    processes = len({d.process_index for d in mesh.devices.flat})
    return f"{axes} ({mesh.devices.size} devices, {processes} processes)"


def rules_context(rules: Sequence[tuple[str, Any]] | None) -> contextlib.AbstractContextManager:
    """Flax's logical axis rules in force (activation sharding constraints apply), or
    nothing when ``rules`` is None (XLA propagates shardings from params and batch)."""
    return contextlib.nullcontext() if rules is None else nn.logical_axis_rules(list(rules))
