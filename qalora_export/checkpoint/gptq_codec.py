"""The AutoGPTQ tensors of one quantized linear <-> :class:`QuantizedLinear`.

Per quantized linear ``<module>`` with ``in`` inputs, ``out`` outputs, ``G = in / group_size``
groups and ``b`` bits (packing: ``packing.py``, 32-bit words, LSB-first bit stream):

============================  =======  ==================================================
tensor                        dtype    shape / meaning
============================  =======  ==================================================
``<module>.qweight``          int32    ``[in * b / 32, out]``: codes packed along ``in``
``<module>.qzeros``           int32    ``[G, ceil(out * b / 32)]``: zero-points packed along out
``<module>.scales``           float16  ``[G, out]``
``<module>.g_idx``            int32    ``[in]``: group of each input column (act-order)
``<module>.bias``             float16  ``[out]``, optional
============================  =======  ==================================================

For b = 3 the runtimes load only layers whose ``in`` and ``out`` are multiples of 32 (whole
packing cycles); the writer refuses other widths, the reader accepts whole-cycle padding.
"""

from __future__ import annotations

from typing import Optional

import torch

from qalora_export.checkpoint.gptq_config import STORED_ZERO_OFFSET, THREE_BIT_WIDTH_MULTIPLE, GPTQConfig, zero_range
from qalora_export.core.packing import cycle_codes, pack_codes, unpack_codes
from qalora_export.core.record import QuantizedLinear, all_finite
from qalora_export.errors import CheckpointError, ConfigError, FormatLimitError

# --------------------------------------------------------------------------------------- codec


def encode_layer(layer: QuantizedLinear, checkpoint_format: str) -> dict[str, torch.Tensor]:
    """Pack a record whose zero-points are integral into the format's tensors (suffix -> tensor).

    Raises:
        FormatLimitError: a zero-point is fractional or outside :func:`zero_range`; a 3-bit layer
            whose widths are not multiples of 32.
    """
    if layer.bits == 3 and (layer.in_features % THREE_BIT_WIDTH_MULTIPLE or layer.out_features % THREE_BIT_WIDTH_MULTIPLE):
        raise FormatLimitError(
            f"{layer.name}: 3-bit GPTQ packs {THREE_BIT_WIDTH_MULTIPLE} codes into 3 words, so the layer's "
            f"widths must be multiples of {THREE_BIT_WIDTH_MULTIPLE}, but it is {layer.out_features}x"
            f"{layer.in_features} (out x in); GPTQModel and AutoGPTQ cannot load such a checkpoint. "
            f"Use --bits 2, 4 or 8 for this model"
        )
    qzeros = encode_zero_points(layer, checkpoint_format)
    tensors = {
        "qweight": pack_codes(layer.codes.T, layer.bits, dim=0),
        "qzeros": qzeros,
        "scales": layer.scales.to(torch.float16).contiguous(),
        "g_idx": layer.g_idx.to(torch.int32).contiguous(),
    }
    if layer.bias is not None:
        tensors["bias"] = layer.bias.to(torch.float16).contiguous()
    return tensors


def encode_zero_points(layer: QuantizedLinear, checkpoint_format: str) -> torch.Tensor:
    """``qzeros`` int32 ``[G, ceil(out * b / 32)]`` of a record whose zero-points are integral.

    Needs only the record's zeros (codes may be a :func:`codes_placeholder`).

    Raises:
        FormatLimitError: a zero-point is fractional or outside :func:`zero_range`.
    """
    zeros = layer.zeros.to(torch.float64)
    if not torch.equal(zeros, torch.round(zeros)):
        raise FormatLimitError(f"{layer.name}: GPTQ zero-points must be integers; round them first")
    lo, hi = zero_range(layer.bits, checkpoint_format)
    if zeros.numel() and (float(zeros.min()) < lo or float(zeros.max()) > hi):
        raise FormatLimitError(
            f"{layer.name}: zero-points span [{float(zeros.min()):g}, {float(zeros.max()):g}] but "
            f"{checkpoint_format} {layer.bits}-bit holds [{lo}, {hi}]"
            + (" (v1 stores zero - 1, so a zero of 0 cannot be stored: use --checkpoint-format gptq_v2)"
               if checkpoint_format == "gptq" and float(zeros.min()) >= 0 else "")
        )
    stored = zeros.to(torch.int64) - STORED_ZERO_OFFSET[checkpoint_format]
    return pack_codes(stored, layer.bits, dim=1)


def decode_layer(name: str, tensors: dict[str, torch.Tensor], config: GPTQConfig,
                 in_features: Optional[int] = None) -> QuantizedLinear:
    """Unpack a layer's tensors (suffix -> tensor) into a :class:`QuantizedLinear`.

    ``in_features`` defaults to what ``qweight`` implies (``rows * 32 / bits``).
    """
    missing = [s for s in ("qweight", "qzeros", "scales") if s not in tensors]
    if missing:
        raise CheckpointError(f"{name}: missing tensors {', '.join(name + '.' + m for m in missing)}")
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    for suffix, t, dtypes in (("qweight", qweight, (torch.int32,)), ("qzeros", qzeros, (torch.int32,)),
                              ("scales", scales, (torch.float16, torch.bfloat16, torch.float32))):
        if t.dtype not in dtypes or t.ndim != 2:
            raise CheckpointError(f"{name}.{suffix}: expected a 2-D {dtypes[0]} tensor, got {t.dtype} {tuple(t.shape)}")
    bits = config.bits
    out_features = int(qweight.shape[1])
    words_per_cycle = cycle_codes(bits) * bits // 32
    if qweight.shape[0] % words_per_cycle:
        raise CheckpointError(
            f"{name}.qweight: {qweight.shape[0]} rows is not a whole number of {bits}-bit packing cycles "
            f"({words_per_cycle} words each); the tensor does not hold {bits}-bit codes (check `bits` in the config)"
        )
    in_features = in_features or int(qweight.shape[0]) * 32 // bits
    group_size = config.group_size_for(in_features)
    if in_features % group_size:
        raise CheckpointError(f"{name}: group_size {group_size} does not divide in_features {in_features}")
    n_groups = in_features // group_size
    if "g_idx" in tensors:
        g_idx = tensors["g_idx"].to(torch.int64)
        if g_idx.shape != (in_features,):
            raise CheckpointError(f"{name}.g_idx: shape {tuple(g_idx.shape)}, expected ({in_features},)")
    else:
        g_idx = torch.arange(in_features) // group_size
    n_groups = max(n_groups, int(g_idx.max()) + 1 if g_idx.numel() else 0)
    if scales.shape != (n_groups, out_features):
        raise CheckpointError(f"{name}.scales: shape {tuple(scales.shape)}, expected ({n_groups}, {out_features})")
    if g_idx.numel() and int(g_idx.min()) < 0:
        raise CheckpointError(f"{name}.g_idx: negative group index {int(g_idx.min())}")
    if not all_finite(scales):
        raise CheckpointError(f"{name}.scales: contains NaN or inf; the checkpoint is corrupt")
    try:
        if qweight.is_meta:  # read_layer(with_codes=False): shape only, see codes_placeholder
            codes = codes_placeholder(out_features, in_features)
        else:
            codes = unpack_codes(qweight, bits, dim=0, n_codes=in_features).T.contiguous()
        zeros = decode_zeros(qzeros, bits, out_features, config.checkpoint_format).to(torch.float64)
    except FormatLimitError as exc:
        raise CheckpointError(f"{name}: packed tensors do not match {bits}-bit, {in_features}x{out_features}: {exc}") from exc
    if zeros.shape[0] != n_groups:
        raise CheckpointError(f"{name}.qzeros: {zeros.shape[0]} rows, expected {n_groups} groups")
    bias = tensors.get("bias")
    return QuantizedLinear(
        name=name, bits=bits, group_size=group_size, codes=codes,
        scales=scales.to(torch.float32), zeros=zeros, g_idx=g_idx,
        bias=None if bias is None else bias.to(torch.float32),
    )


def codes_placeholder(out_features: int, in_features: int) -> torch.Tensor:
    """A zero-stride uint8 ``[out, in]`` stand-in for codes that were not read (no memory).

    Records read with ``with_codes=False`` carry it: everything but the codes (shapes, scales,
    zeros, g_idx) is real, so the zero-point fold works on them; the codes stay packed in the file.
    """
    return torch.zeros((1, 1), dtype=torch.uint8).expand(out_features, in_features)


def decode_zeros(qzeros: torch.Tensor, bits: int, out_features: int, checkpoint_format: str) -> torch.Tensor:
    """True zero-points int64 ``[G, out]`` from packed ``qzeros``, as the runtimes compute them.

    v1 ("gptq") adds 1 the way GPTQModel's kernels do: for 2/4/8 bits one add of ``0x...0101`` to
    each packed word, whose carry out of a field that stored -1 (all ones) bumps the neighbouring
    field; for 3 bits field by field, modulo ``2**b``. So a v1 checkpoint holding a true zero of 0
    decodes here to what the runtimes compute, wrong values included; writers never produce one.
    """
    if checkpoint_format == "gptq_v2":
        return unpack_codes(qzeros, bits, dim=1, n_codes=out_features).to(torch.int64)
    if bits == 3:
        stored = unpack_codes(qzeros, bits, dim=1, n_codes=out_features).to(torch.int64)
        return (stored + 1) % (1 << bits)
    ones = 0
    for j in range(32 // bits):
        ones |= 1 << (bits * j)
    words = ((qzeros.to(torch.int64) & 0xFFFFFFFF) + ones) & 0xFFFFFFFF  # carry out of the word is lost
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    return unpack_codes(words, bits, dim=1, n_codes=out_features).to(torch.int64)


def check_writable_zeros(layer: QuantizedLinear, checkpoint_format: str) -> None:
    """Raise :class:`ConfigError` if integral zeros fall outside the format's range (pre-flight)."""
    lo, hi = zero_range(layer.bits, checkpoint_format)
    z = layer.zeros
    if z.numel() and (float(z.min()) < lo or float(z.max()) > hi):
        raise ConfigError(f"{layer.name}: zero-points outside [{lo}, {hi}] for {checkpoint_format}")
