"""MLX's affine quantization (``mx.quantize(mode="affine")``, as mlx-lm 0.32 loads it), as data, plus its
bit packing and this format's tolerances.

A quantized ``nn.QuantizedLinear`` of mlx-lm holds, for a weight ``W`` ``[out, in]`` quantized in
groups of ``group_size`` consecutive inputs (``G = in / group_size``):

==============  ========================  ======================================================
tensor          dtype                     shape / layout
==============  ========================  ======================================================
``weight``      uint32                    ``[out, in * bits / 32]``: the codes of each row as one
                                          LSB-first bit stream (code ``i`` in stream bits
                                          ``[bits*i, bits*i + bits)``), cut into little-endian
                                          32-bit words; 3-, 5- and 6-bit codes straddle words
``scales``      float32 / float16 / bf16  ``[out, G]``
``biases``      same as ``scales``        ``[out, G]``
``bias``        float (optional)          ``[out]``: the linear's own bias (Qwen2 q/k/v)
==============  ========================  ======================================================

Dequantization (MLX's CPU kernel, measured bit for bit: ``scale * q`` rounded, then ``+ bias``
rounded, in the scales' dtype; no fused multiply-add)::

    W[o, i] = scales[o, g] * q[o, i] + biases[o, g],   g = i // group_size

With ``scales = scale`` and ``biases = -scale * zero'`` (docs/design.md §2.3) this is the
project's ``scale * (q - zero')`` with the folded, possibly fractional zero-point: the fold is held
with no change of codes, for every bit width. The stream layout is the one AutoGPTQ packs ``qweight``
with along ``in`` (``core/packing.py``), transposed; here it is packed from the codes with numpy.

What mlx 0.32 accepts (measured): bits 2, 3, 4, 5, 6, 8; group sizes 32, 64, 128 (16 is refused
by ``mx.quantize``). MLX has no ``g_idx``: the groups are runs of consecutive input columns.
"""

from __future__ import annotations

import numpy as np

#: Code widths MLX's affine mode holds.
MLX_BITS = (2, 3, 4, 5, 6, 8)
#: Group sizes MLX's affine kernels accept.
GROUP_SIZES = (32, 64, 128)
WORD_BITS = 32
MODE = "affine"

#: ``--mlx-dtype``: the dtype of scales, biases and the float tensors (embeddings, norms, lm_head).
#: float32 holds the fold exactly (the checkpoint's fp16 scales widen exactly; the float64
#: ``-scale * zero'`` is rounded once to fp32, about 2**-24 relative); float16 and bfloat16 round
#: the biases (and bf16 the scales too), and the export records it (``exact: false``).
DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_DTYPE = "float32"
#: Largest finite float16 (biases and scales outside it cannot be stored as float16).
FP16_MAX = 65504.0

# --- files ----------------------------------------------------------------------------------
CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_WEIGHTS_FILE = "model.safetensors"  # mlx-lm globs model*.safetensors
SHARD_METADATA = {"format": "mlx"}  # what mlx-lm's own save_model writes
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3  # mlx-lm's default shard size (5 GB)
#: config.json key of the merge record (mlx-lm keeps only the keys its ModelArgs name, so it is ignored).
META_KEY = "qalora_export"
#: Files of the base directory that are not copied (weights and the GPTQ configs are rewritten).
NOT_COPIED = ("config.json", "quantize_config.json", "model.safetensors.index.json")
#: Tensors of a transformers checkpoint mlx-lm recomputes (its sanitize drops them).
IGNORED_TENSOR_SUFFIX = "rotary_emb.inv_freq"
#: rope_type values whose mlx-lm RoPE computes what transformers computes (others are refused).
ROPE_TYPES_SUPPORTED = ("default", "linear", "llama3")

# --- weight-level tolerance -----------------------------------------------------------------
#: ``read_weights`` decodes the stored tensors as MLX does. With float32 scales and biases the only
#: loss against the float64 fold is rounding ``-scale * zero'`` to fp32 and the fp32 product and
#: sum: ``|dW| <= 2**-24 * (|scale * q| + 2 * |bias|)``. ``|bias| = scale * |zero'|`` is at most a few
#: times ``scale * 2**bits`` (the group's range) after the fold's shift, so ``|dW| / max|W|`` stays
#: below ~1e-6 (as ONNX's float zero-points). A float16/bfloat16 export declares its rounded biases
#: (``declared_layer``), so the same tolerance then checks the layout, not the rounding.
WEIGHT_TOLERANCE = 1e-6

# --- runtime tolerances (mlx-lm on the CPU, float32) -----------------------------------------
#: As ONNX (formats/onnx/spec.py): fp32 accumulation order differs between MLX's quantized matmul
#: and torch's GEMM (~1e-6 per op, ~1e-5 after a deep stack); 1e-3 relative to max |logit| leaves
#: room for 30+ layers without hiding a layout bug (a wrong group or rope moves logits by percent).
RUNTIME_MAX_DLOGIT_REL = 1e-3
#: mean KL(torch || mlx) over positions, nats.
RUNTIME_MAX_KL = 1e-5
#: A top-1 / greedy disagreement is tolerated only where the reference's top-2 margin is below this
#: many times the measured max |dlogit| (a near-tie, decided by accumulation order).
NEAR_TIE_FACTOR = 2.0
#: float16/bfloat16 exports compute in that dtype in MLX, so they are judged against a floor measured
#: in the same run (the base exported the same way, no adapter, in mlx-lm vs PyTorch), like GGUF:
#: ``mean KL <= KL_FLOOR_FACTOR * floor + KL_EPSILON``.
KL_FLOOR_FACTOR = 3.0
KL_EPSILON = 1e-4
#: Greedy tokens generated per prompt (mlx-lm's KV cache, as its generate runs).
GREEDY_TOKENS = 8


def packed_words(in_features: int, bits: int) -> int:
    """32-bit words per row of ``in_features`` codes (MLX requires whole words)."""
    return in_features * bits // WORD_BITS


def pack_words(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes uint8 ``[rows, in]`` (values < 2**bits) -> MLX ``weight`` uint32 ``[rows, in * bits / 32]``.

    Each row's codes become one LSB-first bit stream (``bits`` bits a code), packed into bytes
    little-endian and read as little-endian uint32 words: the layout of ``mx.quantize`` for every
    width (3, 5 and 6 bits straddle words). ``in * bits`` must be a multiple of 32.
    """
    codes = np.asarray(codes, dtype=np.uint8)
    rows, n = codes.shape
    if (n * bits) % WORD_BITS:
        raise ValueError(f"{n} codes of {bits} bits do not fill whole 32-bit words")
    stream = (codes[:, :, None] >> np.arange(bits, dtype=np.uint8)) & 1  # [rows, in, bits]
    packed = np.packbits(stream.reshape(rows, n * bits), axis=1, bitorder="little")  # [rows, in*bits/8]
    return np.ascontiguousarray(packed).view("<u4").astype(np.uint32, copy=False).reshape(rows, -1)


def unpack_words(words: np.ndarray, bits: int, in_features: int) -> np.ndarray:
    """Inverse of :func:`pack_words`: uint32 ``[rows, in * bits / 32]`` -> uint8 codes ``[rows, in]``."""
    words = np.ascontiguousarray(words, dtype="<u4")
    rows = words.shape[0]
    if words.shape[1] * WORD_BITS != in_features * bits:
        raise ValueError(f"{words.shape[1]} words per row do not hold {in_features} codes of {bits} bits")
    if 8 % bits == 0:  # 2/4/8 bits: whole codes per byte, LSB first (fast path: no bit stream)
        per_byte = 8 // bits
        shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
        data = words.view(np.uint8).reshape(rows, -1)
        return ((data[:, :, None] >> shifts) & np.uint8((1 << bits) - 1)).reshape(rows, in_features)
    stream = np.unpackbits(words.view(np.uint8).reshape(rows, -1), axis=1, bitorder="little")
    weights = (1 << np.arange(bits, dtype=np.uint16)).astype(np.uint16)
    return (stream.reshape(rows, in_features, bits).astype(np.uint16) @ weights).astype(np.uint8)


def dequantize(words: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int,
               group_size: int) -> np.ndarray:
    """MLX's dequantization of stored rows: float32 ``[rows, in]`` = ``scales * q + biases`` computed in
    float32 (``scale * q`` rounded, then the sum rounded), as MLX's CPU kernel does for float32
    scales; float16/bfloat16 scales and biases are widened to float32 first.

    Args:
        words: uint32 ``[rows, in * bits / 32]``.
        scales, biases: ``[rows, G]`` in their stored dtype (numpy float32/float16, or bf16 as float32).
    """
    in_features = scales.shape[1] * group_size
    codes = unpack_words(words, bits, in_features).astype(np.float32)
    s = np.repeat(np.asarray(scales, dtype=np.float32), group_size, axis=1)
    b = np.repeat(np.asarray(biases, dtype=np.float32), group_size, axis=1)
    return (s * codes).astype(np.float32) + b
