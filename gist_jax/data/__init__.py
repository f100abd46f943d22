"""Data pipeline (numpy only, no jax): Alpaca+ files and the synthetic suite -> templates
-> tokenisation with gist tokens inserted by id and truncation -> padded or packed,
per-host, resumable batches.

Modules: ``alpaca`` (file validation and loading), ``synthetic`` (built-in task suite),
``sources`` (one entry point for both), ``templates`` (the paper's prompt formats as
pieces), ``tokenize`` (ids, gist spans, truncation counts), ``batching`` (batch dicts of
the shared contract, packing, host slices, ``BatchIterator``).
"""

from gist_jax.data.alpaca import (
    SPLITS,
    DataFormatError,
    LoadReport,
    load_split,
    parse_examples,
    read_examples,
    write_examples,
)
from gist_jax.data.batching import (
    BatchIterator,
    bucket_length,
    collate_decoder,
    collate_encdec,
    host_slice,
    pack_rows,
)
from gist_jax.data.sources import load_examples
from gist_jax.data.templates import decoder_prompt_text, encoder_source_text
from gist_jax.data.tokenize import (
    DecoderExample,
    EncDecExample,
    PieceEncoder,
    TruncationReport,
    encode_decoder_examples,
    encode_encdec_examples,
    encode_prompts,
)

__all__ = [
    "SPLITS",
    "BatchIterator",
    "DataFormatError",
    "DecoderExample",
    "EncDecExample",
    "LoadReport",
    "PieceEncoder",
    "TruncationReport",
    "bucket_length",
    "collate_decoder",
    "collate_encdec",
    "decoder_prompt_text",
    "encode_decoder_examples",
    "encode_encdec_examples",
    "encode_prompts",
    "encoder_source_text",
    "host_slice",
    "load_examples",
    "load_split",
    "pack_rows",
    "parse_examples",
    "read_examples",
    "write_examples",
]
