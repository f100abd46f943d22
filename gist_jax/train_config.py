"""The training config schema (every key, its default and meaning) and its validation.

Every ``configs/*.py`` starts from ``base_config()`` and changes values, so all experiments
share one set of keys; ``config_flags`` locks the result, so a misspelt command-line
override (``--config.train.lrr=1``) is an error instead of being silently ignored.
``validate`` turns impossible values into one ``ConfigError`` that lists every problem.

Sections:

* ``model``: where the model comes from (a converted checkpoint, the bundled default model,
  or random init from ``model.init`` fields), its tokenizer, and how it runs (``dtype`` is
  the compute dtype, params stay float32; ``scan_layers``; ``remat``).
* ``data``: example source, template settings (gist tokens, attention condition), lengths,
  padding vs packing.
* ``train``: length (steps or epochs), global batch, optimizer, schedule, intervals.
* ``mesh``: device mesh axes ``data`` x ``fsdp`` x ``tensor`` (``-1`` = the rest).
* ``eval``: validation-loss splits and sizes.
"""

from __future__ import annotations

import math

import ml_collections

from gist_jax import gist
from gist_jax.models.attention import IMPLEMENTATIONS
from gist_jax.train import output_loss

# Model sources besides a directory path.
DEFAULT_MODEL = "default"
RANDOM_INIT = ""


OBJECTIVES = ("lm", "distill", "mix")
DISTILL_POSITIONS = ("completion", "after_gist")
SELF_TEACHER, BASE_TEACHER = "self", "base"


class ConfigError(ValueError):
    """A config with impossible values; the message lists every problem by key."""


def base_config() -> ml_collections.ConfigDict:
    """All keys with defaults (a small CPU run of the bundled model on the synthetic suite)."""
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    # "default": the bundled SmolLM2-135M-Instruct (converted on first use, see
    # gist_jax.convert.default_model); a path: a converted checkpoint directory (written by
    # `gist-convert-from-hf`); "": random init from `model.init`.
    c.model.checkpoint = DEFAULT_MODEL
    # Random-init model fields (model_type plus the family config's fields); vocab_size 0
    # means "the tokenizer's size". Ignored when `model.checkpoint` is set.
    c.model.init = ml_collections.ConfigDict()
    # "": the checkpoint's tokenizer; "synthetic_bpe[:N]": the small BPE tokenizer trained on
    # the synthetic suite (gist_jax.tiny_tokenizer); else a Hugging Face tokenizer directory.
    c.model.tokenizer = ""
    c.model.dtype = "float32"  # compute dtype: "float32" | "bfloat16"
    c.model.scan_layers = False  # nn.scan over layers (faster compiles for deep models)
    c.model.remat = "none"  # "none" | "full" | "dots" (save matmul outputs)
    # How attention is computed (the same function): "cpu" (a hand-written gradient, tuned
    # for XLA:CPU) | "reference" (einsums differentiated by JAX) | "cudnn" (NVIDIA GPUs,
    # bfloat16; jax.nn.dot_product_attention's fused kernel) | "flash" (our Pallas kernel:
    # no dense mask, masked-out tiles skipped; LLaMA family; interpreted, slowly, on a
    # CPU); models.attention.
    c.model.attention = "cpu"
    # Rank of the gist adapter: a low-rank residual update that only the gist tokens'
    # positions get, in every layer (LLaMA family). 0: the checkpoint's (none for an HF
    # model); a checkpoint without one gets a new adapter that starts as a no-op.
    c.model.gist_adapter_rank = 0

    c.data = ml_collections.ConfigDict()
    # "synthetic": the built-in suite (gist_jax.data.synthetic); "synthetic_v2",
    # "synthetic_v3", "synthetic_v3_wide": its later versions (gist_jax.data.sources); else
    # a directory or URL prefix holding alpaca_plus_{split}.json files.
    c.data.source = "synthetic"
    c.data.train_split = "train"
    c.data.num_train_examples = -1  # -1: all (synthetic: its default size)
    c.data.num_gist_tokens = 1  # k; 0 trains the no-gist baseline
    c.data.condition = "gist"  # "gist" | "pos_control" | "neg_control"
    # Share of training examples (drawn with train.seed) that see their whole prompt, as
    # under pos_control, with their gist tokens still in the sequence: a mix of conditions
    # in one model (a lever of docs/results.md). Validation examples are never changed.
    c.data.visible_fraction = 0.0
    # Other instruction data mixed into training (a lever of docs/results.md): mix_examples
    # training examples of mix_source (a synthetic suite or an Alpaca+ directory), leaving
    # out examples whose task uses one of mix_exclude_tasks (comma-separated task names,
    # e.g. the ones that would teach a held-out operation). "" / 0: no mix.
    c.data.mix_source = ""
    c.data.mix_examples = 0
    c.data.mix_exclude_tasks = ""
    c.data.max_length = 96  # decoder-only: prompt + completion tokens
    c.data.max_source_length = 128  # encoder-decoder
    c.data.max_target_length = 256
    c.data.packing = False  # several examples per row (segment ids keep them apart)
    c.data.pack_open_rows = 1  # packing: 1 next-fit; N first-fit over N open rows (fuller)
    c.data.bucket_multiple = 32  # padded lengths are multiples of this

    c.train = ml_collections.ConfigDict()
    c.train.steps = 200  # optimizer updates; 0: use `epochs`
    c.train.epochs = 0.0  # used when steps == 0
    c.train.batch_size = 8  # global rows per update (all processes, all micro-batches)
    c.train.grad_accum = 1  # micro-batches per update (scan; one optimizer update)
    c.train.lr = 1e-4
    c.train.schedule = "cosine"  # "cosine" (to 0) | "constant"; both after linear warmup
    c.train.warmup = 0.03  # < 1: fraction of the steps; >= 1: number of steps
    c.train.weight_decay = 0.0  # AdamW; never applied to norm scales
    c.train.clip_norm = 1.0  # global-norm gradient clipping; <= 0: off
    c.train.b1 = 0.9
    c.train.b2 = 0.999
    c.train.eps = 1e-8
    # Decoder-only: run the output layer + cross-entropy only on chunks of this many
    # positions per row that hold loss tokens (gist_jax.train.output_loss); 0 = all logits.
    c.train.loss_chunk = output_loss.DEFAULT_CHUNK
    # Partial fine-tuning (decoder-only, unrolled layers): N > 0 keeps the token embedding
    # and the first N layers at their pretrained values and never computes their
    # gradients (gist_jax.train.freezing); 0 trains everything.
    c.train.frozen_layers = 0
    # Comma-separated fragments of parameter paths to leave at their starting values (e.g.
    # "mlp": every layer's MLP): the optimizer gives them zero updates and keeps no moments;
    # their gradients are still computed, so this saves no time. "" trains everything.
    c.train.frozen_params = ""
    # Per-parameter learning rates: "fragment=factor,..." multiplies the learning rate of
    # every parameter whose path contains the fragment (the first matching entry counts),
    # e.g. "mlp=0.3" trains every MLP at 0.3 x train.lr. "" = one rate for all.
    c.train.lr_scales = ""
    # What the step minimises: "lm" (cross-entropy on the completion), "distill" (context
    # distillation: KL(teacher || student), the teacher seeing the whole prompt, the
    # student under data.condition) or "mix" ((1 - w) * lm + w * distill, w =
    # distill_weight). Decoder-only models.
    c.train.objective = "lm"
    c.train.distill_weight = 0.5  # "mix" only
    # The teacher: "self" (the student itself behind stop_gradient, no extra params),
    # "base" (the frozen starting weights of model.checkpoint) or a converted checkpoint
    # directory (e.g. a trained pos_control model's WORKDIR/export), held frozen.
    c.train.teacher = "self"
    c.train.distill_temperature = 1.0  # softens both distributions; the KL is scaled by T^2
    # Where the KL is taken: "completion" (the loss positions) or "after_gist" (every real
    # position after the gist tokens: the input as well).
    c.train.distill_positions = "completion"
    c.train.seed = 0  # params init (random-init models), data order
    c.train.log_every = 10
    c.train.eval_every = 100  # 0: only at the end
    c.train.checkpoint_every = 100  # 0: only at the end (and on SIGTERM)
    c.train.keep_checkpoints = 2
    c.train.async_checkpoint = True
    # A step whose loss, gradient norm or learning rate is NaN/inf is not applied; this
    # many such steps in a row stop the run with an error, keeping the last checkpoint
    # written before them.
    c.train.max_nonfinite_steps = 5
    c.train.export = True  # write WORKDIR/export (a converted checkpoint dir) at the end

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    # Apply the model's activation sharding constraints (logical axis rules in context).
    c.mesh.constrain_activations = True

    c.eval = ml_collections.ConfigDict()
    c.eval.splits = ("validation_seen", "validation_unseen")
    c.eval.num_examples = 200  # per split; -1: all
    c.eval.batch_size = 16
    # gist-train: at every evaluation also decode the splits under each condition and log
    # ROUGE-L / exact match (gist_jax.evaluate.make_train_hook; files in WORKDIR/eval/STEP).
    # Library callers pass train_and_evaluate(..., eval_hooks=[...]) instead.
    c.eval.generate = False
    return c


def validate(config: ml_collections.ConfigDict) -> None:
    """Raise ``ConfigError`` listing every impossible value (key = value: why)."""
    problems: list[str] = []

    def need(ok: bool, key: str, why: str) -> None:
        if not ok:
            value = config
            for part in key.split("."):
                value = value[part]
            problems.append(f"{key}={value!r}: {why}")

    t, d, m = config.train, config.data, config.model
    need(t.lr > 0, "train.lr", "the learning rate must be > 0")
    need(math.isfinite(t.lr), "train.lr", "the learning rate must be finite")
    need(t.max_nonfinite_steps >= 1, "train.max_nonfinite_steps", "must be >= 1")
    need(t.loss_chunk >= 0, "train.loss_chunk", "must be >= 0 (0 = all logits at once)")
    need(t.frozen_layers >= 0, "train.frozen_layers", "must be >= 0 (0 = train every layer)")
    if t.frozen_layers > 0:
        need(
            not m.scan_layers,
            "train.frozen_layers",
            "needs model.scan_layers=False (frozen layers are whole unrolled modules)",
        )
    need(t.objective in OBJECTIVES, "train.objective", f"expected one of {OBJECTIVES}")
    need(0 < t.distill_weight <= 1, "train.distill_weight", "must be in (0, 1]")
    need(t.distill_temperature > 0, "train.distill_temperature", "must be > 0")
    need(
        t.distill_positions in DISTILL_POSITIONS,
        "train.distill_positions",
        f"expected one of {DISTILL_POSITIONS}",
    )
    need(bool(t.teacher), "train.teacher", "expected 'self', 'base' or a checkpoint directory")
    if t.objective != "lm" and t.teacher == "base":
        need(
            m.checkpoint != RANDOM_INIT,
            "train.teacher",
            "'base' is the starting checkpoint, and model.checkpoint is empty (random init)",
        )
    need(t.steps >= 0, "train.steps", "must be >= 0")
    need(t.steps > 0 or t.epochs > 0, "train.epochs", "set train.steps or train.epochs > 0")
    need(t.batch_size >= 1, "train.batch_size", "must be >= 1")
    need(t.grad_accum >= 1, "train.grad_accum", "must be >= 1")
    if t.batch_size >= 1 and t.grad_accum >= 1:
        need(
            t.batch_size % t.grad_accum == 0,
            "train.batch_size",
            f"must be divisible by train.grad_accum={t.grad_accum}",
        )
    need(t.schedule in ("cosine", "constant"), "train.schedule", "expected 'cosine' or 'constant'")
    need(t.warmup >= 0, "train.warmup", "must be >= 0")
    need(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    need(t.log_every >= 1, "train.log_every", "must be >= 1")
    need(t.eval_every >= 0, "train.eval_every", "must be >= 0")
    need(t.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0")
    need(d.condition in gist.CONDITIONS, "data.condition", f"expected one of {gist.CONDITIONS}")
    need(d.num_gist_tokens >= 0, "data.num_gist_tokens", "must be >= 0")
    need(0 <= d.visible_fraction < 1, "data.visible_fraction", "must be in [0, 1)")
    need(d.mix_examples >= 0, "data.mix_examples", "must be >= 0")
    need(
        bool(d.mix_source) == (d.mix_examples > 0),
        "data.mix_examples",
        f"set data.mix_source and data.mix_examples together (mix_source={d.mix_source!r})",
    )
    need(d.max_length >= 2, "data.max_length", "must be >= 2")
    need(d.bucket_multiple >= 1, "data.bucket_multiple", "must be >= 1")
    need(d.pack_open_rows >= 1, "data.pack_open_rows", "must be >= 1")
    need(m.dtype in ("float32", "bfloat16"), "model.dtype", "expected 'float32' or 'bfloat16'")
    need(m.remat in ("none", "full", "dots"), "model.remat", "expected 'none', 'full' or 'dots'")
    need(m.attention in IMPLEMENTATIONS, "model.attention", f"expected one of {IMPLEMENTATIONS}")
    need(m.gist_adapter_rank >= 0, "model.gist_adapter_rank", "must be >= 0 (0 = none)")
    if m.attention == "cudnn":
        import jax

        need(
            m.dtype == "bfloat16", "model.attention", "cuDNN attention needs model.dtype='bfloat16'"
        )
        need(
            jax.default_backend() == "gpu",
            "model.attention",
            f"cuDNN attention needs an NVIDIA GPU; this run's backend is {jax.default_backend()}",
        )
    need(config.eval.batch_size >= 1, "eval.batch_size", "must be >= 1")
    if m.checkpoint == RANDOM_INIT:
        need("model_type" in m.init, "model.init", "random init needs model.init.model_type")
    for axis in ("data", "fsdp", "tensor"):
        size = config.mesh[axis]
        need(size == -1 or size >= 1, f"mesh.{axis}", "must be a positive size or -1")
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
