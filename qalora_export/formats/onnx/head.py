"""The lm head requantized for decode speed (``--lm-head int8|int4``, opt-in): a ``MatMulNBits`` node
holding a round-to-nearest copy of the float head.

The head (or, with tied embeddings, the embedding table it reads) is float in the base and untouched
by the adapter; the export keeps it float by default (``--lm-head float``): exact. onnxruntime-genai's
own builder quantizes it to int4, and per decoded token it is read whole: at SmolLM2's size more
bytes than all the int4 layers. Requantizing it is a trade the user chooses, recorded as such:

- the node is named :data:`HEAD_NODE` (never a transformers module path), so the weight level's
  reader (``read.py``) does not take it for a folded layer, and ``metadata_props``
  ``qalora_export.merge`` gets ``lm_head``: ``{"kind", "bits", "block_size", "source", "exact": false}``;
- a tied embedding keeps its exact float ``Gather``; only the lm head reads the quantized copy;
- the runtime level (``verify.py``) checks the artifact exactly against the unmerged model with this
  module's declared head (:func:`declared_head`, recomputed from the base) and judges the head's own
  cost against a floor: the same model in PyTorch with the float head vs the declared head.

Quantizer: per block of :data:`HEAD_BLOCK_SIZE` consecutive inputs of a row, min-max round to
nearest with the range widened to contain 0 (the quantizer of docs/design.md §2.1),
``scale = (max - min) / (2^b - 1)`` rounded up to fp16 before the codes are chosen (so fp32 and fp16
exports hold the same values, and the range fits the codes), integer ``zero = round(-min / scale)`` in
``0..2^b - 1``; each weight is within one ``scale`` of its code's value (half of it but where the
rounded zero-point clips an end of the range).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from qalora_export.core.weight_rows import row_ranges
from qalora_export.errors import ConfigError, FormatLimitError
from qalora_export.formats.onnx import spec as spec

LM_HEAD_KINDS = ("float", "int8", "int4")
HEAD_BITS = {"int8": 8, "int4": 4}
HEAD_BLOCK_SIZE = 32  # onnxruntime-genai's builder's default block size for its int4 CPU models
HEAD_NODE = "lm_head.requantized"  # node name; its initializers are "<HEAD_NODE>.MatMulNBits.*"
HEAD_RECORD_KEY = "lm_head"  # key of the merge record (``metadata_props`` qalora_export.merge)
TIED_SOURCE, UNTIED_SOURCE = "model.embed_tokens.weight", "lm_head.weight"
#: the runtime level's rule for the head's own cost, as GGUF's floor rule (formats/gguf/spec.py):
#: mean KL(float head || artifact) <= factor x mean KL(float head || declared head, in PyTorch) + epsilon
HEAD_KL_FLOOR_FACTOR = 3.0
HEAD_KL_EPSILON = 1e-4
#: bytes of float32 rows quantized at a time
ROW_BLOCK_BYTES = 16 << 20


def check_lm_head_option(kind: str) -> None:
    if kind not in LM_HEAD_KINDS:
        raise ConfigError(f"--lm-head {kind!r} is not one of {list(LM_HEAD_KINDS)}")


def head_source(model_config: dict) -> str:
    """The float table the lm head computes with: the embedding when tied, else ``lm_head.weight``."""
    return TIED_SOURCE if bool(model_config.get("tie_word_embeddings", False)) else UNTIED_SOURCE


@dataclass
class HeadBlocks:
    """RTN fields of a head ``[N, K]``: codes uint8 ``[N, K]``, scales float32 ``[N, K / block]`` (fp16
    values), integer zeros uint8 ``[N, K / block]``."""

    codes: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray
    bits: int
    block_size: int

    def dequantize(self) -> np.ndarray:
        """float64 ``[N, K]``: ``scale * (code - zero)``."""
        return spec.dequantize(self.codes, self.scales, self.zeros, self.block_size)


def quantize_head(weight: np.ndarray, kind: str, block_size: int = HEAD_BLOCK_SIZE) -> HeadBlocks:
    """Round-to-nearest ``weight`` ``[N, K]`` (float) to ``kind`` (``int8``/``int4``), a row block at a time.

    Raises:
        FormatLimitError: ``K`` is not a multiple of ``block_size``, or a value is not finite, or a
            block's scale does not fit fp16.
    """
    check_lm_head_option(kind)
    bits = HEAD_BITS[kind]
    n, k = weight.shape
    if k % block_size:
        raise FormatLimitError(f"--lm-head {kind}: the head's {k} inputs are not a multiple of the block size "
                               f"{block_size}; keep --lm-head float")
    kb, qmax = k // block_size, (1 << bits) - 1
    codes = np.empty((n, k), dtype=np.uint8)
    scales = np.empty((n, kb), dtype=np.float32)
    zeros = np.empty((n, kb), dtype=np.uint8)
    for r0, r1 in row_ranges(n, k * 4, ROW_BLOCK_BYTES):
        w = np.asarray(weight[r0:r1], dtype=np.float32).reshape(r1 - r0, kb, block_size)
        if not np.isfinite(w).all():
            raise FormatLimitError(f"--lm-head {kind}: the head holds NaN or inf (rows {r0}..{r1 - 1}); "
                                   f"keep --lm-head float")
        lo = np.minimum(w.min(axis=-1), 0.0)
        hi = np.maximum(w.max(axis=-1), 0.0)
        exact = (hi - lo) / qmax
        scale = exact.astype(np.float16)
        scale = np.where(scale.astype(np.float32) < exact, np.nextafter(scale, np.float16(np.inf)), scale)
        scale = scale.astype(np.float32)  # fp16, rounded up: the block's range stays inside the codes
        if not np.isfinite(scale).all():
            raise FormatLimitError(f"--lm-head {kind}: a block's scale exceeds fp16 (rows {r0}..{r1 - 1}); "
                                   f"keep --lm-head float")
        tiny = scale == 0  # an all-zero block (or one below fp16's smallest scale): codes at the zero
        scale = np.where(tiny, np.float32(1.0), scale)
        zero = np.clip(np.rint(-lo / scale), 0, qmax)
        q = np.clip(np.rint(w / scale[..., None]) + zero[..., None], 0, qmax)
        q = np.where(tiny[..., None], zero[..., None], q)
        codes[r0:r1] = q.reshape(r1 - r0, k).astype(np.uint8)
        scales[r0:r1] = scale
        zeros[r0:r1] = zero.astype(np.uint8)
    return HeadBlocks(codes, scales, zeros, bits, block_size)


def head_linear(blocks: HeadBlocks):
    """The :class:`~qalora_export.formats.onnx.graph.NBitsLinear` of a quantized head."""
    from qalora_export.formats.onnx.graph import NBitsLinear

    n, k = blocks.codes.shape
    return NBitsLinear(k=k, n=n, bits=blocks.bits, block_size=blocks.block_size,
                       b=spec.pack_b(blocks.codes, blocks.bits, blocks.block_size), scales=blocks.scales,
                       zero_points=spec.pack_zero_points(blocks.zeros, blocks.bits))


def head_record(kind: str, model_config: dict, blocks: HeadBlocks, weight: np.ndarray) -> dict:
    """What the merge record says about a requantized head (``exact: false``, its error)."""
    err = float(np.abs(blocks.dequantize() - np.asarray(weight, dtype=np.float64)).max()) if weight.size else 0.0
    return {"kind": kind, "bits": blocks.bits, "block_size": blocks.block_size, "source": head_source(model_config),
            "quantizer": "rtn-minmax-asymmetric", "exact": False, "max_abs_error": err,
            "note": "the lm head is requantized from the base's float table (--lm-head); the folded "
                    "projections are exact"}


def declared_head(model, record: dict) -> np.ndarray:
    """The head an artifact with ``record`` (its merge record's ``lm_head``) declares: float64 ``[N, K]``,
    recomputed from ``model``'s base with :func:`quantize_head`.

    Raises:
        ConfigError: the record names a kind or block size this version does not write.
    """
    kind, block = record.get("kind"), record.get("block_size", HEAD_BLOCK_SIZE)
    if kind not in HEAD_BITS or block not in spec.BLOCK_SIZES:
        raise ConfigError(f"the artifact's lm_head record {record!r} names a head this version cannot recompute "
                          f"(kinds {list(HEAD_BITS)}); verify it with the qalora-export that wrote it")
    source = record.get("source") or head_source(model.model_config)
    weight = model.read_tensor(source).float().numpy()
    return quantize_head(weight, kind, int(block)).dequantize()


def requantized_head(merge_record: Optional[dict]) -> Optional[dict]:
    """The merge record's ``lm_head`` entry, or None when the head is the base's own (float)."""
    head = (merge_record or {}).get(HEAD_RECORD_KEY)
    return head if isinstance(head, dict) else None
