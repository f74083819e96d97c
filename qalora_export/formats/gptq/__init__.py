"""AutoGPTQ checkpoints (transformers, GPTQModel, vLLM): the folded zero-points written back as integers.

The checkpoint layout (packing, v1/v2 zero offsets, config files) is also the project's input
format, so it lives in the core, once (``qalora_export/checkpoint/gptq.py``); this package holds
what writing it as an output adds. Stages: ``spec`` (tolerances, metadata key, output dtypes),
``encode`` (float folded zeros -> integers in range, or a refusal), ``write`` (the sharded
checkpoint, atomically), ``read`` (decode, merge metadata, inspect), ``verify`` and ``runtime``
(GPTQModel, in a child process).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from qalora_export.extras import Requirement
from qalora_export.formats.gptq.runtime import RUNTIME
from qalora_export.formats.protocol import MemoryModel, StagedFormat, parse_byte_size


class GPTQ(StagedFormat):
    name = "gptq"
    help = "an AutoGPTQ checkpoint (transformers, GPTQModel, vLLM); fractional zero-points rounded"
    has_verb = False  # ``merge --to gptq``, the default
    output_suffix = ""
    artifact = "a GPTQ checkpoint directory (config.json with a quantization_config)"
    # writing needs none; verify runs transformers + GPTQModel (with optimum)
    export_requires: tuple[Requirement, ...] = ()
    runtime_requires = (Requirement("gptq", ("gptqmodel", "optimum")),)
    runtime = RUNTIME
    # docs/scale.md: the fingerprint check's one tensor (tensors are otherwise copied file to file)
    memory = MemoryModel(baseline_bytes=320 << 20, bytes_per_weight=0.3, float_tensor_copies=0.0)
    holds_float_zeros = False
    writes_shards = True
    writes_lora = True  # lora.py: a plain LoRA for its runtimes (docs/lora.md)

    def detect(self, path: Path) -> bool:
        """A directory whose configs carry a GPTQ quantization config (a float model's do not)."""
        import json

        from qalora_export.checkpoint.gptq_config import CONFIG_FILE, QUANTIZE_CONFIG_FILE

        path = Path(path)
        if not path.is_dir() or not (path / CONFIG_FILE).is_file():
            return False
        if (path / QUANTIZE_CONFIG_FILE).is_file():
            return True
        try:
            config = json.loads((path / CONFIG_FILE).read_text())
        except (OSError, ValueError):
            return True  # unreadable: the checkpoint reader names what is wrong with it
        return isinstance(config, dict) and isinstance(config.get("quantization_config"), dict)

    def add_options(self, parser: argparse.ArgumentParser) -> None:
        from qalora_export.checkpoint.gptq_config import CHECKPOINT_FORMATS

        parser.add_argument("--checkpoint-format", choices=CHECKPOINT_FORMATS,
                            help="gptq: v1 (stores zero-1); gptq_v2: true zeros. Default: the base's")
        parser.add_argument("--require-exact", action="store_true",
                            help="refuse to round fractional folded zero-points (GPTQ stores integers)")
        parser.add_argument("--clamp-zeros", action="store_true",
                            help="clamp folded zeros outside the format's range instead of refusing (reported)")
        parser.add_argument("--max-shard-size", type=parse_byte_size, default="2GiB", metavar="SIZE",
                            help="largest safetensors shard of the GPTQ output, e.g. 5GB, 500MiB or bytes "
                                 "(default 2GiB; a bigger single tensor gets a shard of its own)")

    def options_from_args(self, args: argparse.Namespace, progress: Callable[[str], None]) -> dict:
        return {"checkpoint_format": args.checkpoint_format, "require_exact": args.require_exact,
                "clamp_zeros": args.clamp_zeros, "max_shard_bytes": args.max_shard_size, "progress": progress}

    def output_bytes(self, config: dict, bits: int, group_size: int) -> int:
        """The input's layout: the codes and scales are copied, zero-points re-encoded in place."""
        from qalora_export.checkpoint.shapes import checkpoint_tensors

        return sum(s.nbytes for s in checkpoint_tensors(config, bits, group_size))


FORMAT = GPTQ()
