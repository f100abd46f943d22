"""Mesh construction, logical axis rules, per-process batch rows, the optimizer pieces,
multi-process start-up resolution, and the sharded train step itself: the same steps on
1 device, on fsdp x tensor, and on data x fsdp with gradient accumulation give the same
losses and params."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from gist_jax import distributed
from gist_jax import sharding as shd
from gist_jax.models import llama
from gist_jax.models.family import LLAMA
from gist_jax.train import optim
from gist_jax.train import state as ts
from gist_jax.train import step as tstep

# ---------------------------------------------------------------------------------------
# Mesh shapes


def test_resolve_mesh_shape_fills_the_rest():
    assert shd.resolve_mesh_shape({"data": 1, "fsdp": -1, "tensor": 2}, 8) == (1, 4, 2)
    assert shd.resolve_mesh_shape({"data": 2, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
    assert shd.resolve_mesh_shape({"fsdp": -1}, 4) == (1, 4, 1)


@pytest.mark.parametrize(
    "spec, pattern",
    [
        ({"data": 1, "fsdp": 3, "tensor": 1}, "has 3 devices but 8 are available"),
        ({"data": -1, "fsdp": 3, "tensor": 1}, "multiply to 3, which does not divide the 8"),
        ({"data": -1, "fsdp": -1, "tensor": 1}, "at most one axis may be -1"),
        ({"data": 0, "fsdp": -1, "tensor": 1}, "positive or -1"),
        ({"data": 1, "model": 8}, "unknown mesh axes"),
    ],
)
def test_resolve_mesh_shape_errors(spec, pattern):
    with pytest.raises(shd.MeshError, match=pattern):
        shd.resolve_mesh_shape(spec, 8)


def test_make_mesh_on_a_subset_of_devices():
    mesh = shd.make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, jax.devices()[:4])
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 2}
    assert list(mesh.devices.flat) == jax.devices()[:4]
    full = shd.make_mesh({"data": 2, "fsdp": -1, "tensor": 1})
    assert full.devices.size == 8 and full.shape["fsdp"] == 4


def test_multi_slice_devices_get_a_hybrid_mesh():
    @dataclasses.dataclass(frozen=True)
    class FakeDevice:  # what create_hybrid_device_mesh reads from a device
        id: int
        slice_index: int
        process_index: int
        platform: str = "cpu"
        device_kind: str = "cpu"

    devices = [FakeDevice(i, slice_index=i // 4, process_index=i // 2) for i in range(8)]
    grid = shd.device_grid((4, 2, 1), devices)
    slice_of = np.vectorize(lambda d: d.slice_index)(grid)
    # Slices are the outer part of the data axis: only data-parallel traffic crosses them.
    np.testing.assert_array_equal(slice_of[:2], 0)
    np.testing.assert_array_equal(slice_of[2:], 1)
    assert sorted(d.id for d in grid.flat) == list(range(8))
    with pytest.raises(
        shd.MeshError, match=r"data axis \(1\) must be a multiple of the slice count"
    ):
        shd.device_grid((1, 8, 1), devices)


# ---------------------------------------------------------------------------------------
# Logical axis rules


def test_logical_to_spec_rules_and_skips():
    mesh = shd.make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, jax.devices()[:4])
    assert shd.logical_to_spec(("embed", "mlp"), (64, 128), mesh) == P("fsdp", "tensor")
    assert shd.logical_to_spec(("vocab", "embed"), (512, 64), mesh) == P("tensor", "fsdp")
    # 49153 rows (49152 + <GIST>) do not divide by tensor=2: that rule is skipped.
    assert shd.logical_to_spec(("vocab", "embed"), (49153, 64), mesh) == P(None, "fsdp")
    # Scanned layers and norm scales are replicated.
    assert shd.logical_to_spec(("layers", "norm"), (2, 64), mesh) == P()
    # A mesh axis is used once per array: the second "embed" stays replicated.
    assert shd.logical_to_spec(("embed", "embed"), (64, 64), mesh) == P("fsdp")
    # batch -> (data, fsdp), but data has size 1 here, so only fsdp remains.
    assert shd.logical_to_spec(("batch", "length"), (8, 16), mesh) == P("fsdp")
    mesh8 = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert shd.logical_to_spec(("batch", "length"), (8, 16), mesh8) == P(("data", "fsdp"))
    with pytest.raises(ValueError, match="do not match shape"):
        shd.logical_to_spec(("embed",), (4, 4), mesh)


def test_activation_rules_drop_non_dividing_names():
    mesh = shd.make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, jax.devices()[:4])
    rules = dict(shd.activation_rules(mesh, {"vocab": 49153, "heads": 4, "mlp": 128}))
    assert rules["vocab"] is None
    assert rules["heads"] == "tensor" and rules["mlp"] == "tensor"
    assert rules["batch"] == "fsdp"


def test_tiny_llama_param_shardings():
    cfg = _tiny_llama()
    mesh = shd.make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, jax.devices()[:4])
    sh = shd.tree_shardings(LLAMA.abstract_params(cfg), LLAMA.param_axes(cfg), mesh)
    assert sh["layers"]["self_attn"]["q_proj"]["kernel"].spec == P(None, "fsdp", "tensor")
    assert sh["layers"]["self_attn"]["o_proj"]["kernel"].spec == P(None, "tensor", None, "fsdp")
    assert sh["layers"]["mlp"]["down_proj"]["kernel"].spec == P(None, "tensor", "fsdp")
    assert sh["layers"]["input_layernorm"]["scale"].spec == P()
    assert sh["embed_tokens"]["embedding"].spec == P("tensor", "fsdp")


def test_process_rows_and_global_batch():
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert shd.process_batch_rows(mesh, 8) == (0, 8)
    local = {"x": np.arange(8 * 3, dtype=np.int32).reshape(8, 3)}
    out = shd.make_global_batch(local, mesh, 8)
    assert out["x"].sharding.spec == P(("data", "fsdp"), None)
    np.testing.assert_array_equal(np.asarray(out["x"]), local["x"])


# ---------------------------------------------------------------------------------------
# Optimizer


def test_schedules():
    cos = optim.make_schedule(1.0, 100, "cosine", 0.1)
    assert float(cos(0)) == 0.0 and float(cos(10)) == pytest.approx(1.0)
    assert float(cos(55)) == pytest.approx(0.5, abs=1e-6)
    assert float(cos(100)) == pytest.approx(0.0, abs=1e-6)
    const = optim.make_schedule(2.0, 100, "constant", 4)
    assert [float(const(s)) for s in (0, 2, 4, 99)] == pytest.approx([0.0, 1.0, 2.0, 2.0])
    assert float(optim.make_schedule(3.0, 10, "constant", 0)(0)) == 3.0
    with pytest.raises(ValueError, match=r"train\.lr must be > 0"):
        optim.make_schedule(0.0, 10)


def test_weight_decay_skips_norm_scales():
    cfg = _tiny_llama()
    axes = LLAMA.param_axes(cfg)
    mask = optim.decay_mask(axes)
    assert mask["layers"]["input_layernorm"]["scale"] is False
    assert mask["norm"]["scale"] is False
    assert mask["layers"]["mlp"]["up_proj"]["kernel"] is True
    params = jax.jit(LLAMA.init_params, static_argnums=0)(cfg, jax.random.key(0))
    tx = optim.make_optimizer(optax.constant_schedule(0.1), axes, weight_decay=0.5, clip_norm=0)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zero_grads, tx.init(params), params)
    # With zero gradients only weight decay moves params: norms must not move.
    assert float(jnp.abs(updates["norm"]["scale"]).max()) == 0.0
    kernel = params["lm_head"]["kernel"]
    np.testing.assert_allclose(updates["lm_head"]["kernel"], -0.1 * 0.5 * kernel, rtol=1e-6)


# ---------------------------------------------------------------------------------------
# Multi-process start-up (resolution only; real processes are in test_multihost.py)


def test_distributed_resolution():
    assert distributed.resolve(env={}) is None
    spec = distributed.resolve("10.0.0.1:1234", 4, 2, env={})
    assert (spec.coordinator_address, spec.num_processes, spec.process_id) == (
        "10.0.0.1:1234",
        4,
        2,
    )
    assert distributed.resolve("h:1", 1, 0, env={}) is None
    with pytest.raises(ValueError, match="must be given together"):
        distributed.resolve("h:1", None, 0, env={})
    with pytest.raises(ValueError, match="not in"):
        distributed.resolve("h:1", 2, 2, env={})
    slurm_env = {
        "SLURM_NTASKS": "4",
        "SLURM_PROCID": "3",
        "SLURM_JOB_ID": "4097",
        "SLURM_STEP_NODELIST": "gpu[007-010],login1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_LOCALID": "0",
    }
    spec = distributed.resolve(env=slurm_env)
    assert spec.coordinator_address == "gpu007:61441"
    assert (spec.num_processes, spec.process_id, spec.local_device_ids) == (4, 3, None)
    spec = distributed.resolve(env=slurm_env | {"SLURM_NTASKS_PER_NODE": "4", "SLURM_LOCALID": "2"})
    assert spec.local_device_ids == (2,)
    assert distributed.resolve(mode="none", env=slurm_env) is None
    assert distributed.resolve(mode="auto", env={}) == "auto"
    jax_env = {"JAX_COORDINATOR_ADDRESS": "a:5", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    assert distributed.resolve(env=jax_env).process_id == 1
    assert distributed.first_slurm_host("node1") == "node1"
    assert distributed.first_slurm_host("n[3,5-7]") == "n3"


@pytest.mark.parametrize(
    "launch, env, local_ids",
    [
        # `srun --ntasks=4` on one node: no SLURM_NTASKS_PER_NODE, the step's count says 4.
        ("srun --ntasks=4", {"SLURM_STEP_TASKS_PER_NODE": "4", "SLURM_TASKS_PER_NODE": "4"}, (2,)),
        # sbatch --ntasks-per-node=2 over 3 nodes.
        (
            "--ntasks-per-node=2",
            {"SLURM_TASKS_PER_NODE": "2(x3)", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NODEID": "1"},
            (2,),
        ),
        # Uneven: 3 tasks on node 0, 1 on node 1; this task is node 1's only one.
        ("uneven, alone", {"SLURM_STEP_TASKS_PER_NODE": "3,1", "SLURM_NODEID": "1"}, None),
        ("uneven, shared", {"SLURM_STEP_TASKS_PER_NODE": "3,1", "SLURM_NODEID": "0"}, (2,)),
        # One task per node (launch/slurm.sbatch): every GPU of the node.
        ("one per node", {"SLURM_STEP_TASKS_PER_NODE": "1(x4)", "SLURM_NODEID": "2"}, None),
        # The job's count when the step's is missing.
        ("job count only", {"SLURM_TASKS_PER_NODE": "4"}, (2,)),
    ],
)
def test_slurm_gpu_per_task_for_each_way_of_launching(launch, env, local_ids):
    base = {
        "SLURM_NTASKS": "4",
        "SLURM_PROCID": "2",
        "SLURM_JOB_ID": "7",
        "SLURM_STEP_NODELIST": "gpu[1-4]",
        "SLURM_LOCALID": "2",
    }
    spec = distributed.resolve(env=base | env)
    assert spec.local_device_ids == local_ids, launch
    with pytest.raises(ValueError, match="cannot parse SLURM_STEP_TASKS_PER_NODE"):
        distributed.tasks_on_this_node({"SLURM_STEP_TASKS_PER_NODE": "2(y3)"})


# ---------------------------------------------------------------------------------------
# The sharded step


def _tiny_llama() -> llama.LlamaConfig:
    return llama.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        scan_layers=True,
    )


def _batch(seed: int, rows: int = 8, length: int = 16) -> dict[str, np.ndarray]:
    """Padded decoder batch with a gist token at position 2 and a varied loss mask."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, 120, (rows, length)).astype(np.int32)
    lens = rng.randint(6, length + 1, rows)
    col = np.arange(length)[None]
    pos = np.where(col < lens[:, None], col, -1).astype(np.int32)
    ids[:, 2] = 127
    targets = np.where(pos >= 0, np.roll(ids, -1, 1), 0).astype(np.int32)
    targets[np.arange(rows), lens - 1] = 0
    return {
        "input_ids": ids,
        "positions": pos,
        "segment_ids": (pos >= 0).astype(np.int32),
        "targets": targets,
        "loss_mask": ((col >= 3) & (col < lens[:, None] - 1)).astype(np.float32),
        "gist_first": np.where(pos >= 0, 2, -1).astype(np.int32),
        "gist_last": np.where(pos >= 0, 2, -1).astype(np.int32),
    }


def _run_steps(mesh_spec: dict[str, int], num_devices: int, grad_accum: int):
    cfg = _tiny_llama()
    mesh = shd.make_mesh(mesh_spec, jax.devices()[:num_devices])
    axes = LLAMA.param_axes(cfg)
    schedule = optim.make_schedule(1e-2, 10, "cosine", 0)
    tx = optim.make_optimizer(schedule, axes, weight_decay=0.1)
    abstract = ts.abstract_state(LLAMA.abstract_params(cfg), tx)
    shardings = ts.state_shardings(abstract, axes, mesh, tx)
    state = ts.init_state(lambda k: LLAMA.init_params(cfg, k), tx, shardings, seed=0)
    step = jax.jit(
        tstep.step_function(llama.build_model(cfg), LLAMA, tx, schedule, "gist", grad_accum),
        in_shardings=(shardings, shd.batch_sharding(mesh)),
        out_shardings=(shardings, shd.replicated(mesh)),
        donate_argnums=0,
    )
    losses = []
    with jax.set_mesh(mesh):
        for i in range(3):
            state, metrics = step(state, shd.make_global_batch(_batch(i), mesh, 8))
            losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params), state


def test_sharded_step_matches_single_device_and_grad_accumulation():
    ref_losses, ref_params, ref_state = _run_steps({"data": 1, "fsdp": 1, "tensor": 1}, 1, 1)
    assert int(ref_state.step) == 3
    for spec, n, accum in [
        ({"data": 1, "fsdp": 2, "tensor": 2}, 4, 1),
        ({"data": 2, "fsdp": 2, "tensor": 1}, 4, 2),
    ]:
        losses, params, state = _run_steps(spec, n, accum)
        np.testing.assert_allclose(losses, ref_losses, atol=1e-5, err_msg=str(spec))
        # Adam divides by sqrt(v): float-order differences in near-zero gradients move a
        # param by a fraction of one update (lr 1e-2), hence the looser tolerance.
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=3e-4), params, ref_params)
        q = state.params["layers"]["self_attn"]["q_proj"]["kernel"]
        if spec["tensor"] == 2:
            assert q.sharding.spec == P(None, "fsdp", "tensor")
            # Adam moments are sharded like their params.
            mu = state.opt_state[1][0].mu["layers"]["self_attn"]["q_proj"]["kernel"]
            assert mu.sharding.spec == q.sharding.spec
