"""The AutoGPTQ checkpoint configuration: file names, the zero-point convention of each
``checkpoint_format`` and the quantization config.

Zero convention, from ``checkpoint_format`` in the quantization config: ``"gptq"`` (v1) stores
``zero - 1``; ``"gptq_v2"`` stores ``zero``. Both store the value in ``b`` bits, so v1 holds true
zeros ``1 .. 2**b - 1`` (a true zero of 0 would be stored as -1, which wraps and decodes wrong in
every v1 runtime) and v2 holds ``0 .. 2**b - 1``.

Configuration: ``config.json`` carries ``quantization_config`` (``quant_method: "gptq"``, bits,
group_size, desc_act, sym, checkpoint_format, pack_dtype); ``quantize_config.json`` repeats it.
Weights live in ``model.safetensors`` or in shards listed by ``model.safetensors.index.json``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from qalora_export.core.packing import SUPPORTED_BITS
from qalora_export.errors import CheckpointError

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
CONFIG_FILE = "config.json"
QUANTIZE_CONFIG_FILE = "quantize_config.json"
SINGLE_WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Exactness of this format (docs/design.md §3.1): zero-points are integers in b bits.
STORED_ZERO_OFFSET = {"gptq": 1, "gptq_v2": 0}
# 3-bit layers: GPTQModel registers ceil(n * 3 / 32) words but decodes whole 3-word cycles, so only
# widths that are multiples of 32 load (checked by loading in transformers + GPTQModel).
THREE_BIT_WIDTH_MULTIPLE = 32

def zero_range(bits: int, checkpoint_format: str) -> tuple[int, int]:
    """Inclusive range of *true* zero-points the format can hold without wrapping."""
    offset = STORED_ZERO_OFFSET[checkpoint_format]
    return offset, (1 << bits) - 1


@dataclass(frozen=True)
class GPTQConfig:
    """The quantization fields of an AutoGPTQ checkpoint that decoding depends on."""

    bits: int
    group_size: int
    desc_act: bool
    sym: bool
    checkpoint_format: str

    #: AutoGPTQ's ``group_size`` for one group per row (per-channel quantization)
    PER_ROW = -1

    @property
    def per_row(self) -> bool:
        """One quantization group per output row (``group_size == -1``)."""
        return self.group_size == self.PER_ROW

    def group_size_for(self, in_features: int) -> int:
        """The group size of a layer with ``in_features`` inputs (all of them when per-row)."""
        return in_features if self.per_row else self.group_size

    def to_json(self) -> dict:
        """The ``quantization_config`` block transformers, GPTQModel and vLLM read."""
        return {
            "quant_method": "gptq",
            "bits": self.bits,
            "group_size": self.group_size,
            "desc_act": self.desc_act,
            "sym": self.sym,
            "lm_head": False,
            "format": self.checkpoint_format,
            "checkpoint_format": self.checkpoint_format,
            "pack_dtype": "int32",
            "true_sequential": True,
            "meta": {"quantizer": ["qalora-export"]},
        }


def parse_gptq_config(obj: dict, source: Path) -> GPTQConfig:
    """Validate a ``quantization_config`` / ``quantize_config.json`` object."""
    method = obj.get("quant_method", "gptq")
    if method != "gptq":
        raise CheckpointError(f"{source}: quant_method is {method!r}; only GPTQ checkpoints are read")
    bits = obj.get("bits")
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in SUPPORTED_BITS:  # 4.0 == 4, True == 1
        raise CheckpointError(f"{source}: bits={bits!r} is not supported; expected one of {SUPPORTED_BITS}")
    group_size = obj.get("group_size")
    if (not isinstance(group_size, int) or isinstance(group_size, bool) or group_size == 0
            or group_size < GPTQConfig.PER_ROW):
        raise CheckpointError(f"{source}: group_size={group_size!r} must be a positive integer (or -1)")
    fmt = obj.get("checkpoint_format", obj.get("format", "gptq"))
    if fmt not in CHECKPOINT_FORMATS:
        raise CheckpointError(
            f"{source}: checkpoint_format={fmt!r} is not readable; supported: {CHECKPOINT_FORMATS} "
            f"(convert marlin/bitblas/awq checkpoints to gptq first)"
        )
    pack_dtype = obj.get("pack_dtype", "int32")
    if pack_dtype != "int32":
        raise CheckpointError(f"{source}: pack_dtype={pack_dtype!r}; only int32 packing is supported")
    for flag in ("desc_act", "sym"):
        if not isinstance(obj.get(flag, False), bool):
            raise CheckpointError(f"{source}: {flag}={obj.get(flag)!r} must be true or false")
    return GPTQConfig(bits=bits, group_size=group_size, desc_act=obj.get("desc_act", False),
                      sym=obj.get("sym", True), checkpoint_format=fmt)
