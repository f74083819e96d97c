"""Q4_1 encoding of a quantized layer: ``d = scale``, ``m = -scale * zero'`` per 32-weight block, the
codes copied from the packed ``qweight`` (never requantized).

What Q4_1 cannot hold is refused with :class:`FormatLimitError` (docs/design.md §3.3): 8-bit codes
(Q8_0 is symmetric: an asymmetric 8-bit layer would need requantization, which this tool does not do
silently or at all), act-order groups, group sizes that are not multiples of 32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from qalora_export.checkpoint.merged_view import MergedView
from qalora_export.core.packing import WORD_BITS, column_word_bytes, unpack_codes
from qalora_export.core.record import QuantizedLinear, contiguous_g_idx
from qalora_export.core.weight_rows import row_ranges
from qalora_export.errors import FormatLimitError
from qalora_export.formats.gguf import spec as spec

# --------------------------------------------------------------------------------- Q4_1 encoding


@dataclass
class Q4_1Stats:
    """What packing one layer rounded."""

    max_m_rounding: float  # max |fp16(m) - m|
    max_d_rounding: float  # max |fp16(scale) - scale| (0 for fp16 checkpoint scales)
    fold_shift: float = 0.0  # max |zero' - zero| of the fold, code units


def q4_1_constraint(name: str, bits: int, group_size: int, in_features: int, act_order: bool) -> Optional[str]:
    """Why Q4_1 cannot hold this layer exactly (docs/design.md §3), or None when it can."""
    if bits not in spec.Q4_1_BITS:
        return (f"{name}: {bits}-bit codes do not fit GGUF Q4_1 (2/3/4-bit only). llama.cpp's Q8_0 is "
                f"symmetric (no zero-point), so an asymmetric {bits}-bit layer could only be requantized, "
                f"which this tool refuses to do; quantize the base with --bits 4 (or 2/3), or export with "
                f"--to onnx / --to gptq")
    if group_size % spec.QK4_1 or in_features % spec.QK4_1:
        return (f"{name}: group size {group_size} is not a multiple of {spec.QK4_1}, the Q4_1 block length, "
                f"so a block would span groups with different scales; quantize the base with "
                f"--group-size 32, 64 or 128")
    if act_order:
        return (f"{name}: act-order (desc_act) groups are not runs of consecutive columns, but a Q4_1 block "
                f"is 32 consecutive columns with one scale; quantize the base without --act-order")
    return None


def check_q4_1_layer(layer: QuantizedLinear) -> None:
    """Refuse a layer Q4_1 cannot hold exactly, naming the constraint."""
    problem = q4_1_constraint(layer.name, layer.bits, layer.group_size, layer.in_features, layer.is_act_order)
    if problem:
        raise FormatLimitError(problem)


def preflight_q4_1(model: MergedView) -> None:
    """Check every quantized layer against Q4_1 from headers and ``g_idx`` alone, before writing."""
    shape_of = _Shapes(model)
    for name in model.quantized_modules:
        in_f = shape_of(f"{name}.qweight")[0] * WORD_BITS // model.bits
        gs = model.base.config.group_size_for(in_f)
        act_order = False
        if f"{name}.g_idx" in shape_of.files and not gs % spec.QK4_1:
            g_idx = model.read_tensor(f"{name}.g_idx").to(torch.int64)
            act_order = not torch.equal(g_idx, contiguous_g_idx(in_f, gs))
        problem = q4_1_constraint(name, model.bits, gs, in_f, act_order)
        if problem:
            raise FormatLimitError(problem)


def encode_q4_1(layer: QuantizedLinear, row_perm: Optional[np.ndarray] = None,
                qweight: Optional[np.ndarray] = None) -> tuple[np.ndarray, Q4_1Stats]:
    """A folded layer as Q4_1 blocks uint8 ``[out, in / 32 * 20]`` (rows permuted by ``row_perm``).

    ``qweight``: the layer's packed GPTQ ``qweight`` (int32 ``[in * bits / 32, out]``). When
    given, the codes come from its words (:func:`block_code_bytes`) and ``layer.codes`` is not
    read, so a record from ``read_layer(with_codes=False)`` does; same bytes as from the codes.
    """
    check_q4_1_layer(layer)
    if qweight is None:
        codes = layer.codes.numpy()
        if codes.size and int(codes.max()) > spec.Q4_1_MAX_CODE:
            raise FormatLimitError(f"{layer.name}: a code exceeds {spec.Q4_1_MAX_CODE}, the largest Q4_1 value")
    d_blocks, m_blocks, stats = _q4_1_block_params(layer)
    if row_perm is not None:
        d_blocks, m_blocks = d_blocks[row_perm], m_blocks[row_perm]
    if qweight is not None:
        return _q4_1_from_words(qweight, layer.bits, layer.in_features, row_perm, d_blocks, m_blocks), stats
    if row_perm is not None:
        codes = codes[row_perm]
    return spec.pack_q4_1(codes, d_blocks, m_blocks), stats


def _q4_1_block_params(layer: QuantizedLinear) -> tuple[np.ndarray, np.ndarray, Q4_1Stats]:
    """``d`` and ``m`` float16 ``[out, in / 32]`` of each block (``scale``, ``-scale * zero'`` of its
    group), and their fp16 rounding; refuses values fp16 cannot hold."""
    scale = layer.scales.to(torch.float64).numpy()  # [G, out]
    m = -scale * layer.zeros.to(torch.float64).numpy()
    for label, values in (("scale (d)", scale), ("m = -scale * zero'", m)):
        if values.size and not np.abs(values).max() <= spec.FP16_MAX:
            worst = np.unravel_index(np.argmax(np.abs(np.nan_to_num(values, nan=np.inf))), values.shape)
            raise FormatLimitError(
                f"{layer.name}: {label} = {values[worst]:g} at group {worst[0]}, row {worst[1]} is outside fp16 "
                f"(|x| <= {spec.FP16_MAX:g}), the type of Q4_1's d and m; the adapter shifts this zero-point too far")
    d16, m16 = scale.astype(np.float16), m.astype(np.float16)
    stats = Q4_1Stats(
        max_m_rounding=float(np.abs(m16.astype(np.float64) - m).max()) if m.size else 0.0,
        max_d_rounding=float(np.abs(d16.astype(np.float64) - scale).max()) if m.size else 0.0,
    )
    block_group = np.arange(layer.in_features // spec.QK4_1) * spec.QK4_1 // layer.group_size
    return d16.T[:, block_group], m16.T[:, block_group], stats


# rows of Q4_1 built at a time from qweight: the shuffle's temporaries of a row block (about
# 8 passes over its packed bytes) stay in cache and are reused, instead of ~10 fresh full-layer
# arrays (the whole-layer version spent 7 s of a 7B export here)
Q4_1_ROW_BLOCK_BYTES = 1 << 18


def _q4_1_from_words(qweight: np.ndarray, bits: int, in_features: int, row_perm: Optional[np.ndarray],
                     d_blocks: np.ndarray, m_blocks: np.ndarray) -> np.ndarray:
    """Q4_1 blocks uint8 ``[out, in / 32 * 20]`` from GPTQ ``qweight`` (int32 ``[in * bits / 32, out]``),
    a block of output rows at a time (:func:`block_code_bytes` + ``pack_q4_1_from_packed``);
    ``d_blocks``/``m_blocks`` float16 ``[out, in / 32]`` already in output row order."""
    out_features = qweight.shape[1]
    nb = in_features // spec.QK4_1
    blocks = np.empty((out_features, nb * spec.Q4_1_BLOCK_BYTES), dtype=np.uint8)
    for r0, r1 in row_ranges(out_features, nb * spec.QK4_1, Q4_1_ROW_BLOCK_BYTES):  # a code a byte at most
        if row_perm is None:
            packed, code_bits = block_code_bytes(qweight[:, r0:r1], bits, in_features)
        else:
            packed, code_bits = block_code_bytes(qweight, bits, in_features, row_perm[r0:r1])
        spec.pack_q4_1_from_packed(packed, code_bits, d_blocks[r0:r1], m_blocks[r0:r1], out=blocks[r0:r1])
    return blocks


def block_code_bytes(qweight: np.ndarray, bits: int, in_features: int,
                     row_perm: Optional[np.ndarray] = None) -> tuple[np.ndarray, int]:
    """The codes of each output row's 32-code blocks as packed bytes, from GPTQ ``qweight``.

    2- and 4-bit words are already such bytes (GPTQ packs along ``in`` as one little-endian,
    LSB-first stream): one transpose-copy (with the row permutation) of the words. 3-bit codes
    straddle words, so they are unpacked to one code a byte (``packing.unpack_codes``, vectorised).

    Args:
        qweight: int32 ``[in * bits / 32, out]`` (3-bit: whole 3-word cycles).
        row_perm: int64 ``[rows]`` or None: output row ``r`` is column ``row_perm[r]`` of ``qweight``
            (a subset of the columns gives those rows only).

    Returns:
        (uint8 ``[rows, in / 32, 4 * b]``, ``b``) with ``b`` = ``bits`` for 2/4-bit codes, 8 for 3-bit;
        ``rows`` = ``len(row_perm)``, or ``out`` without it.
    """
    out_features = qweight.shape[1] if row_perm is None else len(row_perm)
    if bits in spec.PACKED_CODE_BITS:
        rows = column_word_bytes(qweight, slice(None) if row_perm is None else row_perm)
    else:
        if row_perm is not None:  # only the columns asked for
            qweight, row_perm = qweight[:, row_perm], None
        codes = unpack_codes(torch.from_numpy(np.ascontiguousarray(qweight)), bits, dim=0,
                             n_codes=in_features).numpy()  # [in, rows]
        rows, bits = np.ascontiguousarray(codes.T if row_perm is None else codes.T[row_perm]), 8
    return rows.reshape(out_features, in_features // spec.QK4_1, spec.QK4_1 * bits // 8), bits


class _Shapes:
    """Tensor shapes from safetensors headers, without reading data."""

    def __init__(self, model: MergedView):
        self.files = model.base.tensor_files
        self.handles: dict = {}

    def __call__(self, key: str) -> tuple[int, ...]:
        from safetensors import safe_open
        path = self.files[key]
        if path not in self.handles:
            self.handles[path] = safe_open(str(path), framework="pt")
        return tuple(self.handles[path].get_slice(key).get_shape())
