"""GGUF for llama.cpp: the folded model as Q4_1 blocks (``d = scale``, ``m = -scale * zero'``).

Stages, one file each: ``spec`` (Q4_1 block layout, tolerances, tensor names and the architectures
llama, qwen2, qwen3 as data), ``container`` (reading a GGUF header and its tensors, split files),
``hparams`` (config.json -> llama.cpp hyperparameters), ``encode`` (codes -> Q4_1 blocks),
``kquant`` (Q6_K for an opt-in requantized head), ``plan`` (the output's tensors), ``write`` (the only module that drives gguf-py's writer), ``tokenizer`` and
``tokenizer_spm`` (byte-level BPE and SentencePiece tokenizers as GGUF metadata), ``read`` (this
project's own reader), ``verify`` and ``runtime`` (llama.cpp, in a child process).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from qalora_export.extras import Requirement
from qalora_export.formats.gguf.runtime import RUNTIME
from qalora_export.formats.protocol import MemoryModel, StagedFormat, parse_byte_size


class GGUF(StagedFormat):
    name = "gguf"
    help = "a llama.cpp GGUF with Q4_1 blocks"
    has_verb = True
    output_suffix = ".gguf"
    artifact = "a .gguf file"
    # writing needs none (gguf is a base requirement); verify runs llama.cpp
    export_requires: tuple[Requirement, ...] = ()
    runtime_requires = (Requirement("llamacpp", ("llama_cpp",)),)
    runtime = RUNTIME
    # docs/scale.md: qweight and its Q4_1 blocks, and the previous tensor's blocks still queued for
    # the writer thread, over gguf-py's imports and the writer threads' buffers
    memory = MemoryModel(baseline_bytes=500 << 20, bytes_per_weight=2.0, float_tensor_copies=0.0)
    holds_float_zeros = True
    writes_shards = False
    writes_lora = True  # lora.py: a plain LoRA for its runtimes (docs/lora.md)

    def detect(self, path: Path) -> bool:
        return Path(path).is_file() and Path(path).suffix == ".gguf"

    def add_options(self, parser: argparse.ArgumentParser) -> None:
        from qalora_export.formats.gguf.spec import EMBEDDING_DTYPES

        parser.add_argument("--embeddings", choices=EMBEDDING_DTYPES, default="f16",
                            help="type of the token embedding and the output head (untied) in the GGUF: f16 "
                                 "(default, the checkpoint's own values), f32, or requantized, not exact: q8_0, or "
                                 "q6_k as llama.cpp's Q4_1 files store the head (faster decode; rows a multiple "
                                 "of 256)")
        parser.add_argument("--split-max-size", type=parse_byte_size, default=None, metavar="SIZE",
                            help="split the GGUF into files of at most SIZE of tensors (e.g. 2GB), named "
                                 "<name>-00001-of-0000N.gguf like llama.cpp's gguf-split; llama.cpp loads the first")

    def options_from_args(self, args: argparse.Namespace, progress: Callable[[str], None]) -> dict:
        return {"embeddings": args.embeddings, "split_max_bytes": args.split_max_size}

    def output_bytes(self, config: dict, bits: int, group_size: int) -> int:
        """Q4_1 (20 bytes per 32 weights) plus fp16 embeddings and norms."""
        from qalora_export.checkpoint.shapes import float_tensor_bytes, quantized_weight_count
        from qalora_export.formats.gguf.spec import Q4_1_BLOCK_BYTES, QK4_1

        return quantized_weight_count(config) // QK4_1 * Q4_1_BLOCK_BYTES + float_tensor_bytes(config, bits, group_size)


FORMAT = GGUF()
