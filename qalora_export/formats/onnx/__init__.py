"""ONNX for onnxruntime and onnxruntime-genai: a LLaMA-family decoder whose quantized projections are
``com.microsoft.MatMulNBits`` nodes holding the folded codes, scales and zero-points.

Stages: ``spec`` (MatMulNBits layout, tolerances and file names as data), ``encode`` (a folded
layer -> MatMulNBits inputs: float, uint8 or split zero-points), ``lowrank`` (a split residual as
``U @ V``), ``pack`` (q/k/v and gate/up as one node each), ``head`` (the opt-in requantized lm
head), ``decoder`` (the decoder's shape and rotary caches from ``config.json``), ``graph`` (the decoder graph, built with the ``onnx``
library), ``write`` (the artifact directory, atomically), ``genai`` (``genai_config.json``), ``read`` (this project's own reader),
``verify`` and ``runtime`` (onnxruntime and onnxruntime-genai, in a child process).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from qalora_export.extras import Requirement
from qalora_export.formats.onnx.runtime import RUNTIME
from qalora_export.formats.protocol import MemoryModel, StagedFormat


class ONNX(StagedFormat):
    name = "onnx"
    help = "ONNX with com.microsoft.MatMulNBits (onnxruntime, onnxruntime-genai)"
    has_verb = True
    output_suffix = ""
    artifact = "an ONNX directory (model.onnx)"
    # the writer builds the graph with onnx; verify runs onnxruntime and onnxruntime-genai
    export_requires = (Requirement("onnx", ("onnx",)),)
    runtime_requires = (Requirement("onnx", ("onnx", "onnxruntime", "onnxruntime_genai")),)
    runtime = RUNTIME
    # docs/scale.md: qweight and MatMulNBits B laid out 1 MB at a time, the float tables copied once,
    # over onnx's and transformers' configuration imports
    memory = MemoryModel(baseline_bytes=435 << 20, bytes_per_weight=0.6, float_tensor_copies=1.05)
    holds_float_zeros = True
    writes_shards = False

    def detect(self, path: Path) -> bool:
        from qalora_export.formats.onnx.spec import MODEL_FILE

        return Path(path).is_dir() and (Path(path) / MODEL_FILE).is_file()

    def add_options(self, parser: argparse.ArgumentParser) -> None:
        from qalora_export.formats.onnx.head import LM_HEAD_KINDS
        from qalora_export.formats.onnx.spec import ACCURACY_LEVELS, DTYPES

        parser.add_argument("--zero-points", choices=("auto", "float", "split", "uint8"), default="auto",
                            help="auto (default): exact and fastest: uint8 where the folded zeros are integral, else "
                                 "split, with q/k/v and gate/up packed into one node each; float: exact, onnxruntime's "
                                 "slow CPU path; split: exact, uint8 integer part plus a per-group correction; "
                                 "uint8: needs integral zeros (or --allow-rounding)")
        parser.add_argument("--accuracy-level", type=int, choices=ACCURACY_LEVELS, default=0,
                            help="MatMulNBits accuracy_level (4 = int8 activations, faster, not exact)")
        parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="activation/scale dtype")
        parser.add_argument("--lm-head", choices=LM_HEAD_KINDS, default="float",
                            help="float (default): the base's own float head, exact; int8/int4: the lm head (a tied "
                                 "embedding's table) requantized by RTN in blocks of 32 into a MatMulNBits node, "
                                 "faster decode, not exact (recorded; verify judges it against a floor)")
        parser.add_argument("--allow-rounding", action="store_true",
                            help="with --zero-points uint8: round fractional zeros (reported)")

    def options_from_args(self, args: argparse.Namespace, progress: Callable[[str], None]) -> dict:
        options = {"zero_points": args.zero_points, "accuracy_level": args.accuracy_level, "dtype": args.dtype}
        if args.allow_rounding:
            options["allow_rounding"] = True
        if getattr(args, "lm_head", "float") != "float":
            options["lm_head"] = args.lm_head
        return options

    def inspect(self, path: Path) -> dict:
        from qalora_export.extras import require

        require(self.export_requires, f"inspect of the ONNX model {path}")
        return super().inspect(path)

    def output_bytes(self, config: dict, bits: int, group_size: int) -> int:
        """Codes in MatMulNBits B (3-bit codes in a 4-bit container), fp32 scales and float zero-points
        per block (``block_size_for``), plus the float tensors."""
        from qalora_export.checkpoint.shapes import float_tensor_bytes, quantized_weight_count
        from qalora_export.formats.onnx.spec import block_size_for, container_bits

        weights = quantized_weight_count(config)
        blocks = weights // block_size_for(group_size)
        return weights * container_bits(bits) // 8 + blocks * 8 + float_tensor_bytes(config, bits, group_size)


FORMAT = ONNX()
