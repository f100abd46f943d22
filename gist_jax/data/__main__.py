"""``python -m gist_jax.data --source=synthetic_v3 --out_dir=DIR``: every split of a
synthetic suite written as Alpaca+ files (``alpaca_plus_{split}.json``), to read back
like the real ones or to inspect."""

from __future__ import annotations

from absl import app, flags

from gist_jax.data import sources


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    splits = sources.suite_module(f.source).SPLITS
    sizes = {s: f.train_size if s == "train" else f.validation_size for s in splits}
    for split, path in sources.write_splits(f.source, f.out_dir, sizes, f.seed).items():
        print(f"{split}: {sizes[split]} examples -> {path}")


if __name__ == "__main__":
    flags.DEFINE_enum("source", sources.SYNTHETIC_V3, list(sources.SUITES), "Which suite.")
    flags.DEFINE_string("out_dir", None, "Directory for alpaca_plus_{split}.json files.")
    flags.DEFINE_integer("train_size", 20000, "Training examples.")
    flags.DEFINE_integer("validation_size", 400, "Examples per validation split.")
    flags.DEFINE_integer("seed", 0, "Generation seed.")
    flags.mark_flag_as_required("out_dir")
    app.run(main)
