"""MLX for mlx-lm: the folded model as MLX affine-quantized tensors (``scales = scale``,
``biases = -scale * zero'``), which hold the fold exactly for every bit width.

Stages, one file each: ``spec`` (MLX's packing, dtypes, tolerances as data), ``encode`` (a folded
layer -> ``weight``/``scales``/``biases``, and the refusals), ``config`` (``config.json`` as mlx-lm
reads it), ``write`` (the artifact directory, atomically), ``read`` (this project's own reader),
``verify`` and ``runtime`` (mlx-lm on MLX's CPU device, in a child process).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from qalora_export.extras import Requirement
from qalora_export.formats.mlx.runtime import RUNTIME
from qalora_export.formats.protocol import MemoryModel, StagedFormat, parse_byte_size


class MLX(StagedFormat):
    name = "mlx"
    help = "an MLX directory for mlx-lm (affine-quantized, exact fold)"
    has_verb = True
    output_suffix = ""
    artifact = "an MLX directory (config.json with a \"quantization\" block)"
    # Writing needs only numpy and safetensors, but an MLX artifact is only useful, and only checked,
    # where MLX runs: the verb asks for the extra first, as verify does.
    export_requires = (Requirement("mlx", ("mlx",)),)
    runtime_requires = (Requirement("mlx", ("mlx", "mlx_lm")),)
    runtime = RUNTIME
    # one layer's codes unpacked and packed again (uint8 codes, their bit stream, the words) and its
    # float scales/biases; float tensors are read and cast once (estimate, not yet fitted: docs/mlx.md)
    memory = MemoryModel(baseline_bytes=400 << 20, bytes_per_weight=12.0, float_tensor_copies=2.0)
    holds_float_zeros = True
    writes_shards = True

    def detect(self, path: Path) -> bool:
        """A directory whose ``config.json`` has mlx-lm's ``quantization`` block (and no GPTQ config)."""
        path = Path(path)
        if not path.is_dir() or not (path / "config.json").is_file() or (path / "quantize_config.json").exists():
            return False
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            return False
        return isinstance(config, dict) and isinstance(config.get("quantization"), dict)

    def add_options(self, parser: argparse.ArgumentParser) -> None:
        from qalora_export.formats.mlx.spec import DEFAULT_DTYPE, DTYPES

        parser.add_argument("--mlx-dtype", choices=DTYPES, default=DEFAULT_DTYPE,
                            help="dtype of the MLX scales, biases and float tensors: float32 holds the fold "
                                 "exactly; float16/bfloat16 round the biases (reported)")
        parser.add_argument("--mlx-max-shard-size", type=parse_byte_size, default="5GB", metavar="SIZE",
                            help="largest safetensors shard of the MLX output (default 5GB, as mlx-lm)")

    def options_from_args(self, args: argparse.Namespace, progress: Callable[[str], None]) -> dict:
        return {"dtype": args.mlx_dtype, "max_shard_bytes": args.mlx_max_shard_size, "progress": progress}

    def output_bytes(self, config: dict, bits: int, group_size: int) -> int:
        """Packed codes, float32 scales and biases per group, plus the float tensors."""
        from qalora_export.checkpoint.shapes import float_tensor_bytes, quantized_weight_count

        weights = quantized_weight_count(config)
        return weights * bits // 8 + weights // group_size * 8 + float_tensor_bytes(config, bits, group_size)


FORMAT = MLX()
