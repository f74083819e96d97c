"""The GGUF (llama.cpp) format as this project writes it: block layouts, names, keys, tolerances.

Everything format-specific that ``gguf.py`` needs lives here as data or as a small pure function;
no bit mask, block size or tensor name appears outside this module.

Q4_1 block (ggml ``block_q4_1``, 32 weights, 20 bytes, little-endian)::

    offset  size  field
    0       2     d   fp16   scale
    2       2     m   fp16   minimum (value of code 0)
    4       16    qs  uint8  qs[j] = q[j] | q[j + 16] << 4,  j = 0..15

    value[j] = d * q[j] + m

A row of ``in`` weights is ``in / 32`` consecutive blocks; a tensor ``[out, in]`` is stored as
uint8 ``[out, in / 32 * 20]``. With ``d = scale[g, o]`` and ``m = -scale[g, o] * zero'[g, o]``
(docs/design.md §3) a block holds ``scale * (q - zero')`` exactly up to fp16 rounding of ``m`` as long
as the 32 columns of a block lie in one quantization group: ``group_size % 32 == 0`` and groups
are runs of consecutive columns (no act-order). 2-, 3- and 4-bit codes all fit the 4-bit field.

LLaMA q/k row permutation: llama.cpp applies rotary embeddings to interleaved pairs
``(2i, 2i+1)``, transformers to halves ``(i, i + d/2)``; the converter reorders the output rows
of ``q_proj`` and ``k_proj`` (and their biases) so both compute the same attention:
``w.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)`` with
``heads`` the attention heads for q and the key/value heads for k.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGML_QUANT_VERSION, GGMLQuantizationType, LlamaFileType

# ------------------------------------------------------------------------------------ Q4_1 blocks

# gguf-py's constants (the block sizes llama.cpp reads); tests/unit/formats/gguf pins them to the layout
QK4_1, Q4_1_BLOCK_BYTES = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_1]  # 32 weights, fp16 d + fp16 m + 16 bytes
Q4_1_HALF = QK4_1 // 2  # byte j holds codes j (low nibble) and j + 16 (high nibble)
Q4_1_MAX_CODE = 15
NIBBLE_MASK = 0x0F
NIBBLE_SHIFT = 4
FP16_MAX = 65504.0

# Bits whose codes fit the 4-bit field of a Q4_1 block without requantization.
Q4_1_BITS = (2, 3, 4)


def pack_q4_1(codes: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Pack codes and per-block ``d``/``m`` into Q4_1 blocks.

    Args:
        codes: uint8 ``[rows, cols]`` with values in ``0..15``; ``cols % 32 == 0``.
        d: float16 ``[rows, cols / 32]`` block scales.
        m: float16 ``[rows, cols / 32]`` block minima.

    Returns:
        uint8 ``[rows, cols / 32 * 20]``, the bytes llama.cpp reads.
    """
    rows, cols = codes.shape
    if cols % QK4_1:
        raise ValueError(f"Q4_1 rows must be a multiple of {QK4_1} values, got {cols}")
    nb = cols // QK4_1
    if d.shape != (rows, nb) or m.shape != (rows, nb):
        raise ValueError(f"d and m must be [{rows}, {nb}], got {d.shape} and {m.shape}")
    q = np.ascontiguousarray(codes, dtype=np.uint8).reshape(rows, nb, QK4_1)
    qs = (q[..., :Q4_1_HALF] & NIBBLE_MASK) | (q[..., Q4_1_HALF:] << NIBBLE_SHIFT)
    blocks = np.empty((rows, nb, Q4_1_BLOCK_BYTES), dtype=np.uint8)
    blocks[..., 0:2] = np.ascontiguousarray(d, dtype="<f2").view(np.uint8).reshape(rows, nb, 2)
    blocks[..., 2:4] = np.ascontiguousarray(m, dtype="<f2").view(np.uint8).reshape(rows, nb, 2)
    blocks[..., 4:] = qs
    return blocks.reshape(rows, nb * Q4_1_BLOCK_BYTES)


#: Code widths :func:`pack_q4_1_from_packed` takes (codes that divide a byte; 8 = one code a byte).
PACKED_CODE_BITS = (2, 4, 8)
_LOW_NIBBLES = np.uint64(0x0F0F0F0F0F0F0F0F)
_HIGH_NIBBLES = np.uint64(0xF0F0F0F0F0F0F0F0)
#: (shift, mask) steps that spread the 16 2-bit fields of a uint32 into the 16 nibbles of a uint64.
_SPREAD_2_TO_4 = ((16, 0x0000FFFF0000FFFF), (8, 0x00FF00FF00FF00FF), (4, 0x0F0F0F0F0F0F0F0F),
                  (2, 0x3333333333333333))


def pack_q4_1_from_packed(packed: np.ndarray, bits: int, d: np.ndarray, m: np.ndarray,
                          out: Optional[np.ndarray] = None) -> np.ndarray:
    """Q4_1 blocks from codes still packed ``8 / bits`` to a byte, with whole-word shuffles.

    ``packed`` holds each 32-code block as ``32 * bits / 8`` bytes, code ``t`` in bits
    ``[bits * t, bits * t + bits)`` of its little-endian byte stream (GPTQ's words of 2/4-bit codes
    are such bytes). For 4-bit codes the block's first 8 bytes ``L`` (codes 0..15, two a byte) and
    last 8 bytes ``H`` (codes 16..31) are two uint64, and ``qs[j] = q[j] | q[j + 16] << 4`` is
    ``qs[2u] = byte u of (L & 0x0F..) | (H << 4 & 0xF0..)`` and ``qs[2u + 1] = byte u of
    (L >> 4 & 0x0F..) | (H & 0xF0..)``: four 64-bit operations per half-block and a byte
    interleave. 2-bit halves (uint32) are first spread to one code a nibble; one code a byte
    (``bits=8``, 3-bit codes after unpacking) is ``low | high << 4``.

    Args:
        packed: uint8 ``[rows, nb, 4 * bits]``; bits: 2, 4 or 8 (values ``<= Q4_1_MAX_CODE``).
        d, m: float16 ``[rows, nb]``.
        out: uint8 C-contiguous ``[rows, nb * 20]`` to write into (a row block of a larger
            array), or None for a new array.

    Returns:
        uint8 ``[rows, nb * 20]`` (``out`` if given), equal to :func:`pack_q4_1` of the unpacked codes.
    """
    if bits not in PACKED_CODE_BITS:
        raise ValueError(f"packed codes must be {PACKED_CODE_BITS}-bit, got {bits}")
    rows, nb, nbytes = packed.shape
    if nbytes != QK4_1 * bits // 8 or d.shape != (rows, nb) or m.shape != (rows, nb):
        raise ValueError(f"packed {packed.shape}, d {d.shape}, m {m.shape}: expected [{rows}, {nb}, "
                         f"{QK4_1 * bits // 8}] and [{rows}, {nb}]")
    if out is None:
        out = np.empty((rows, nb * Q4_1_BLOCK_BYTES), dtype=np.uint8)
    elif out.shape != (rows, nb * Q4_1_BLOCK_BYTES) or out.dtype != np.uint8 or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous uint8 [{rows}, {nb * Q4_1_BLOCK_BYTES}], got {out.dtype} {out.shape}")
    blocks = out.reshape(rows, nb, Q4_1_BLOCK_BYTES)
    words = blocks.view("<u4")  # [rows, nb, 5]: d | m << 16, then qs as four little-endian words
    words[..., 0] = (np.asarray(d, dtype="<f2").view("<u2").astype(np.uint32)
                     | np.asarray(m, dtype="<f2").view("<u2").astype(np.uint32) << np.uint32(16))
    words[..., 1:] = _q4_1_qs(np.ascontiguousarray(packed), bits).view("<u4")
    return out


def _q4_1_qs(packed: np.ndarray, bits: int) -> np.ndarray:
    """The ``qs`` bytes uint8 ``[rows, nb, 16]`` of :func:`pack_q4_1_from_packed`."""
    rows, nb, _ = packed.shape
    if bits == 8:
        return packed[..., :Q4_1_HALF] | (packed[..., Q4_1_HALF:] << np.uint8(NIBBLE_SHIFT))
    if bits == 4:
        halves = packed.view("<u8")  # [rows, nb, 2]: L, H
        low, high = halves[..., 0], halves[..., 1]
    else:  # 2-bit: each half is a uint32 of 16 fields; spread them to 16 nibbles
        halves = packed.view("<u4").astype(np.uint64)
        for shift, mask in _SPREAD_2_TO_4:
            halves = (halves | (halves << np.uint64(shift))) & np.uint64(mask)
        low, high = halves[..., 0], halves[..., 1]
    shift = np.uint64(NIBBLE_SHIFT)
    even = (low & _LOW_NIBBLES) | ((high << shift) & _HIGH_NIBBLES)  # byte u: q[2u] | q[2u + 16] << 4
    odd = ((low >> shift) & _LOW_NIBBLES) | (high & _HIGH_NIBBLES)  # byte u: q[2u + 1] | q[2u + 17] << 4
    qs = np.empty((rows, nb, Q4_1_HALF // 2, 2), dtype=np.uint8)
    qs[..., 0] = even.astype("<u8", copy=False).view(np.uint8).reshape(rows, nb, Q4_1_HALF // 2)
    qs[..., 1] = odd.astype("<u8", copy=False).view(np.uint8).reshape(rows, nb, Q4_1_HALF // 2)
    return qs.reshape(rows, nb, Q4_1_HALF)


def unpack_q4_1(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of :func:`pack_q4_1`: uint8 ``[rows, nb * 20]`` -> (codes ``[rows, nb*32]``, d, m)."""
    rows, nbytes = blocks.shape
    if nbytes % Q4_1_BLOCK_BYTES:
        raise ValueError(f"Q4_1 rows must be a multiple of {Q4_1_BLOCK_BYTES} bytes, got {nbytes}")
    nb = nbytes // Q4_1_BLOCK_BYTES
    b = np.ascontiguousarray(blocks, dtype=np.uint8).reshape(rows, nb, Q4_1_BLOCK_BYTES)
    d = b[..., 0:2].copy().view("<f2").reshape(rows, nb)
    m = b[..., 2:4].copy().view("<f2").reshape(rows, nb)
    qs = b[..., 4:]
    codes = np.concatenate([qs & NIBBLE_MASK, qs >> NIBBLE_SHIFT], axis=-1)
    return codes.reshape(rows, nb * QK4_1), d, m


def dequantize_q4_1(blocks: np.ndarray) -> np.ndarray:
    """Q4_1 blocks ``[rows, nb * 20]`` -> float64 ``[rows, nb * 32]`` (``d * q + m``)."""
    codes, d, m = unpack_q4_1(blocks)
    rows = codes.shape[0]
    q = codes.reshape(rows, -1, QK4_1).astype(np.float64)
    w = q * d.astype(np.float64)[..., None] + m.astype(np.float64)[..., None]
    return w.reshape(rows, -1)


# ---------------------------------------------------------------------------------- tolerances

# Weight level. Per weight, |W_gguf - W_ref| <= |m16 - m| + q * |d16 - scale|. Scales come from
# fp16 checkpoint fields, so d16 == scale exactly; m16 is m rounded to nearest fp16, whose error
# is at most half an ulp: 2**-11 * |m| for normal numbers, 2**-25 below 2**-14. |m| is the value of
# code 0 of the block, |m| = scale * |zero'|; for an RTN/GPTQ grid and the zero shifts a trained
# adapter makes, |m| stays within the layer's weight range, so we check, per layer,
#     max |W_gguf - W_ref| <= WEIGHT_TOLERANCE * max |W_ref| + WEIGHT_ATOL
# with a factor-2 margin on 2**-11 for m that exceed the layer max (a group with codes far from 0).
# ``export`` also reports the exact rounding it made (``max_m_rounding``).
M_ROUNDING_REL = 2.0 ** -11  # half an fp16 ulp, relative
WEIGHT_TOLERANCE = 2.0 ** -10  # relative to max |W_ref| of the layer
WEIGHT_ATOL = 2.0 ** -24  # fp16 subnormal half-ulp (2**-25) plus float32 evaluation slack

# Runtime level (docs/design.md §4). llama.cpp quantizes activations to 8 bits for Q4_1 dot products, so
# a Q4_1 artifact is judged against the same llama.cpp run on the base exported the same way with
# no adapter (the fold is then the identity), compared with the PyTorch base: the noise floor.
#     passed  <=>  mean KL(artifact vs unmerged PyTorch) <= KL_FLOOR_FACTOR * mean KL(floor) + KL_EPSILON
# KL in nats per position (reference distribution first). The factor allows the adapter to move
# logits into regions with slightly different activation-rounding noise; the epsilon keeps a
# near-zero floor (tiny models, F32 files) from turning float32 noise into a failure.
KL_FLOOR_FACTOR = 3.0
KL_EPSILON = 1e-4

# ------------------------------------------------------------------------------- architectures


@dataclass(frozen=True)
class ArchSpec:
    """How one transformers ``model_type`` maps onto a llama.cpp architecture: what that architecture's
    graph loads and computes, and which hyperparameter keys llama.cpp's converter writes for it (so
    that our metadata equals the converter's; tests/e2e/test_families_gguf.py compares them).

    Whatever a checkpoint has beyond this (a bias the graph does not load, a rope type it does not
    compute, q/k norms on an architecture without them) is refused by ``hparams``/``plan``.
    """

    gguf_arch: str  # value of general.architecture, prefix of the hyperparameter keys
    permute_qk: bool  # llama.cpp uses interleaved (NORM) rope for this arch: permute q/k rows
    rope_types: tuple[str, ...] = ("default", "linear")  # transformers rope_type values the graph computes
    #: per-layer float tensors beyond the norms of :data:`BLOCK_TENSORS` (transformers suffix -> llama.cpp name)
    block_tensors: tuple[tuple[str, str], ...] = ()
    #: projections (``BLOCK_LINEARS`` keys) whose bias the graph adds; any other bias is refused
    biases: tuple[str, ...] = ()
    #: the graph allows ``head_dim * heads != hidden`` (qwen2's output projection is hidden x hidden)
    free_head_dim: bool = True
    #: ``{arch}.vocab_size`` and ``{arch}.rope.dimension_count``: written by the converter's llama class only
    writes_vocab_size: bool = False
    writes_rope_dimension: bool = False
    #: ``{arch}.attention.key_length``/``value_length``: "configured" writes them whenever config.json
    #: names ``head_dim`` (as the converter does); "differs" only when head_dim != hidden / heads, the
    #: value llama.cpp assumes without them (kept for llama so that existing llama exports stay
    #: byte-identical; docs/gguf.md)
    key_length: str = "configured"


_QKV_BIASES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_LLAMA = ArchSpec("llama", permute_qk=True, rope_types=("default", "linear", "llama3"),
                  biases=_QKV_BIASES + ("self_attn.o_proj",), writes_vocab_size=True, writes_rope_dimension=True,
                  key_length="differs")

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA,
    # llama.cpp runs Mistral as "llama" (its llama graph has no sliding-window attention: hparams.py
    # limits the context length to the window)
    "mistral": _LLAMA,
    # NEOX rope (rotate halves, as transformers): no q/k permutation; q/k/v biases; q/o are hidden wide
    "qwen2": ArchSpec("qwen2", permute_qk=False, biases=_QKV_BIASES, free_head_dim=False),
    # qwen2 plus RMS norms of each head's q and k (width head_dim) before rope; biases only with
    # attention_bias (the graph has q/k/v biases but no output-projection bias)
    "qwen3": ArchSpec("qwen3", permute_qk=False, biases=_QKV_BIASES,
                      block_tensors=(("self_attn.q_norm.weight", "attn_q_norm.weight"),
                                     ("self_attn.k_norm.weight", "attn_k_norm.weight"))),
}


def arch_by_gguf_name(name: Optional[str]) -> Optional[ArchSpec]:
    """The :class:`ArchSpec` whose ``gguf_arch`` is ``name`` (None for one this tool does not write)."""
    return next((a for a in ARCHITECTURES.values() if a.gguf_arch == name), None)


# ------------------------------------------------------------------------------- tensor names

# transformers module / tensor names -> llama.cpp tensor names (gguf-py's TENSOR_NAMES spelling).
GLOBAL_TENSORS: dict[str, str] = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
BLOCK_TENSORS: dict[str, str] = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
BLOCK_LINEARS: dict[str, str] = {  # module suffix -> llama.cpp tensor stem (".weight" / ".bias" added)
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
ROPE_FREQS_TENSOR = "rope_freqs.weight"
TOKEN_EMBD_TENSOR = "token_embd.weight"
OUTPUT_TENSOR = "output.weight"
# Tensors of a transformers checkpoint that llama.cpp recomputes itself.
IGNORED_TENSOR_PATTERN = re.compile(r".*rotary_emb\.inv_freq$")

_BLOCK_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_GGUF_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


def gguf_linear_name(module: str) -> Optional[str]:
    """``model.layers.3.self_attn.q_proj`` -> ``blk.3.attn_q`` (None when not a block linear)."""
    match = _BLOCK_RE.match(module)
    if not match or match.group(2) not in BLOCK_LINEARS:
        return None
    return f"blk.{match.group(1)}.{BLOCK_LINEARS[match.group(2)]}"


def hf_linear_name(gguf_tensor: str) -> Optional[str]:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj`` (None otherwise)."""
    match = _GGUF_BLOCK_RE.match(gguf_tensor)
    if not match or not match.group(2).endswith(".weight"):
        return None
    stem = match.group(2)[: -len(".weight")]
    for hf, gg in BLOCK_LINEARS.items():
        if gg == stem:
            return f"model.layers.{match.group(1)}.{hf}"
    return None


def gguf_tensor_name(key: str, arch: Optional[ArchSpec] = None) -> Optional[str]:
    """A non-quantized checkpoint tensor (norms, embeddings, float linears) -> its llama.cpp name.

    ``arch``'s extra per-layer tensors (qwen3's q/k norms) are named only for that architecture.
    Returns None for tensors llama.cpp does not need (rotary inv_freq); raises KeyError otherwise.
    """
    if IGNORED_TENSOR_PATTERN.match(key):
        return None
    if key in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[key]
    match = _BLOCK_RE.match(key)
    if match:
        rest = match.group(2)
        extra = dict(arch.block_tensors) if arch is not None else {}
        if rest in BLOCK_TENSORS or rest in extra:
            return f"blk.{match.group(1)}.{BLOCK_TENSORS.get(rest) or extra[rest]}"
        module, _, suffix = rest.rpartition(".")
        if module in BLOCK_LINEARS and suffix in ("weight", "bias"):
            return f"blk.{match.group(1)}.{BLOCK_LINEARS[module]}.{suffix}"
    raise KeyError(key)


def qk_heads(module: str, n_head: int, n_head_kv: int) -> Optional[int]:
    """Head count the llama.cpp row permutation uses for ``module``; None when not q/k."""
    if module.endswith("self_attn.q_proj"):
        return n_head
    if module.endswith("self_attn.k_proj"):
        return n_head_kv
    return None


def qk_row_permutation(rows: int, heads: int) -> np.ndarray:
    """Index ``p`` (int64 ``[rows]``) with ``w_llamacpp = w_hf[p]`` (see module docstring)."""
    if rows % (2 * heads):
        raise ValueError(f"{rows} rows cannot be split into {heads} heads of rotary pairs")
    idx = np.arange(rows, dtype=np.int64)
    return idx.reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(rows)


# ------------------------------------------------------------------------------ file type codes

# general.file_type (llama_ftype) for what the projections are stored as.
FILE_TYPES = {"q4_1": int(LlamaFileType.MOSTLY_Q4_1), "f32": int(LlamaFileType.ALL_F32),
              "f16": int(LlamaFileType.MOSTLY_F16)}
WEIGHTS_DTYPES = tuple(FILE_TYPES)
EMBEDDING_DTYPES = ("f16", "f32", "q8_0", "q6_k")  # q8_0 / q6_k: requantized from the float tables
REQUANTIZED_EMBEDDINGS = ("q8_0", "q6_k")
QUANTIZATION_VERSION = GGML_QUANT_VERSION  # general.quantization_version of current ggml block layouts

# Our own provenance keys (GGUF allows any key; llama.cpp ignores unknown ones).
KEY_PREFIX = "qalora_export."
