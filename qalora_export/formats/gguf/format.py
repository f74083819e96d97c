"""GGUF export for llama.cpp: the folded QA-LoRA model as Q4_1 blocks, verified in llama.cpp itself.

``export`` writes a complete llama.cpp model (hyperparameters, tokenizer, chat template, tensors)
with gguf-py's writer, streaming one layer at a time. Quantized projections become Q4_1 blocks
with ``d = scale`` and ``m = -scale * zero'`` (layout and exactness: ``gguf_spec.py``); the codes
are copied, never requantized. What Q4_1 cannot hold is refused with :class:`FormatLimitError`:
8-bit codes (Q8_0 is symmetric, so an asymmetric 8-bit layer would need requantization, which this
tool does not do silently or at all), act-order groups, group sizes that are not multiples of 32.

``weights_dtype="f32"``/``"f16"`` writes the unmerged effective weights ``W_hat + dW`` as floats
instead: the reference file of DESIGN.md §4 (and a way to run any base in llama.cpp unquantized).

``read_weights`` decodes a file with this project's own Q4_1 reader; ``verify_runtime`` runs
llama.cpp against the unmerged PyTorch model and judges the result against llama.cpp's own noise
floor (rule and constants in ``gguf_spec.py``).
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from qalora_export.extras import Requirement
from qalora_export.formats.gguf.runtime import RUNTIME as LLAMACPP_RUNTIME
from qalora_export.errors import CheckpointError, ConfigError, FormatLimitError, UnsupportedModelError
from qalora_export.storage.direct_io import DirectWriter
from qalora_export.storage.atomic import atomic_output_file, atomic_output_files
from qalora_export.checkpoint.merged_view import MergedModel, single_threaded_torch
from qalora_export.core.packing import WORD_BITS, column_word_bytes, unpack_codes
from qalora_export.core.record import QuantizedLinear, contiguous_g_idx
from qalora_export.checkpoint.tokenizer_check import check_tokenizer_matches
from qalora_export.core.weight_rows import WeightRows, row_ranges
from qalora_export.storage.write_behind import WriteBehind

from qalora_export.formats.gguf import spec as spec
from qalora_export.formats.gguf.spec import WEIGHT_ATOL, WEIGHT_TOLERANCE  # noqa: F401  (part of the converter contract)

FORMAT = "gguf"
# Optional packages: writing needs none (gguf is a base requirement); verify runs llama.cpp.
EXPORT_REQUIRES: tuple[Requirement, ...] = ()
RUNTIME_REQUIRES = (Requirement("llamacpp", ("llama_cpp",)),)
RUNTIME = LLAMACPP_RUNTIME


# ------------------------------------------------------------------------------ hyperparameters


@dataclass
class HyperParams:
    """The ``config.json`` fields llama.cpp needs, checked (DESIGN: refuse what llama.cpp cannot run)."""

    arch: spec.ArchSpec
    n_layer: int
    hidden: int
    intermediate: int
    n_head: int
    n_head_kv: int
    head_dim: int
    context_length: int
    rms_eps: float
    rope_theta: float
    vocab_size: int
    tied: bool
    rope_scaling: Optional[dict] = None
    notes: list[str] = field(default_factory=list)


def _int(cfg: dict, key: str, source: str) -> int:
    value = cfg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise UnsupportedModelError(f"{source}: config field {key}={value!r} must be a positive integer")
    return value


def read_hyperparams(cfg: dict, source: str = "config.json") -> HyperParams:
    """Check a transformers config against what llama.cpp's LLaMA graph computes."""
    model_type = cfg.get("model_type")
    arch = spec.ARCHITECTURES.get(model_type)
    if arch is None:
        raise UnsupportedModelError(
            f"{source}: model_type {model_type!r} cannot be exported to GGUF by this tool; "
            f"supported: {', '.join(spec.ARCHITECTURES)}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"{source}: hidden_act={cfg.get('hidden_act')!r}; llama.cpp's LLaMA graph uses silu")
    if cfg.get("mlp_bias"):
        raise UnsupportedModelError(f"{source}: mlp_bias=true; llama.cpp's LLaMA graph has no MLP biases")
    n_head = _int(cfg, "num_attention_heads", source)
    hidden = _int(cfg, "hidden_size", source)
    head_dim = cfg.get("head_dim") or hidden // n_head
    rope = dict(cfg.get("rope_parameters") or {})
    rope.update(cfg.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
    if rope_type not in spec.ROPE_TYPES_SUPPORTED:
        raise UnsupportedModelError(
            f"{source}: rope scaling {rope_type!r} is not supported for GGUF export; "
            f"supported: {', '.join(spec.ROPE_TYPES_SUPPORTED)}")
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError(f"{source}: partial_rotary_factor={cfg['partial_rotary_factor']} is not supported")
    hp = HyperParams(
        arch=arch, n_layer=_int(cfg, "num_hidden_layers", source), hidden=hidden,
        intermediate=_int(cfg, "intermediate_size", source), n_head=n_head,
        n_head_kv=cfg.get("num_key_value_heads") or n_head, head_dim=int(head_dim),
        context_length=_int(cfg, "max_position_embeddings", source),
        rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        vocab_size=_int(cfg, "vocab_size", source), tied=bool(cfg.get("tie_word_embeddings", False)),
        rope_scaling=None if rope_type == "default" else {**rope, "rope_type": rope_type},
    )
    window = cfg.get("sliding_window")
    if model_type == "mistral" and window and cfg.get("use_sliding_window", True) and window < hp.context_length:
        # llama.cpp runs Mistral without a sliding window: exact only up to the window.
        hp.notes.append(f"context_length limited to sliding_window={window} (llama.cpp has no sliding window for llama)")
        hp.context_length = int(window)
    return hp


def llama3_rope_factors(hp: HyperParams) -> np.ndarray:
    """``rope_freqs.weight`` for ``rope_type: llama3`` (float32 ``[head_dim / 2]``), as llama.cpp's converter."""
    rs = hp.rope_scaling or {}
    factor = float(rs.get("factor", 8.0))
    low, high = float(rs.get("low_freq_factor", 1.0)), float(rs.get("high_freq_factor", 4.0))
    old_ctx = float(rs.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (hp.rope_theta ** (np.arange(0, hp.head_dim, 2, dtype=np.float32) / hp.head_dim))
    wavelen = 2 * math.pi / freqs.astype(np.float64)
    smooth = (old_ctx / wavelen - low) / (high - low)
    factors = np.where(wavelen < old_ctx / high, 1.0,
                       np.where(wavelen > old_ctx / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
    return factors.astype(np.float32)


# --------------------------------------------------------------------------------- Q4_1 encoding


@dataclass
class Q4_1Stats:
    """What packing one layer rounded."""

    max_m_rounding: float  # max |fp16(m) - m|
    max_d_rounding: float  # max |fp16(scale) - scale| (0 for fp16 checkpoint scales)
    fold_shift: float = 0.0  # max |zero' - zero| of the fold, code units


def q4_1_constraint(name: str, bits: int, group_size: int, in_features: int, act_order: bool) -> Optional[str]:
    """Why Q4_1 cannot hold this layer exactly (DESIGN.md §3), or None when it can."""
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


def preflight_q4_1(model: MergedModel) -> None:
    """Check every quantized layer against Q4_1 from headers and ``g_idx`` alone, before writing."""
    shape_of = _Shapes(model)
    for name in model.quantized_modules:
        in_f = shape_of(f"{name}.qweight")[0] * WORD_BITS // model.bits
        gs = model.group_size if model.group_size > 0 else in_f
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


# ----------------------------------------------------------------------------------- the plan


@dataclass
class _Tensor:
    """One tensor of the output file: its name, stored type and how to produce its data."""

    name: str
    ggml_type: str  # "Q4_1", "Q8_0", "F16", "F32"
    shape: tuple[int, int] | tuple[int]  # logical [rows, cols] (numpy order) or [n]
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        n = int(np.prod(self.shape))
        if self.ggml_type == "Q4_1":
            return n // spec.QK4_1 * spec.Q4_1_BLOCK_BYTES
        if self.ggml_type == "Q8_0":
            from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0]
            return n // block * size
        return n * (2 if self.ggml_type == "F16" else 4)


def _float_array(t: torch.Tensor, ggml_type: str) -> np.ndarray:
    """A float tensor as the stored array: F32, F16 or Q8_0 blocks (gguf-py's reference quantizer)."""
    if ggml_type == "F16" and t.dtype == torch.float16 and not bool(torch.isnan(t).any()):
        # fp16 -> fp32 -> fp16 is the identity on every value but NaN payloads: keep the bytes
        return np.ascontiguousarray(t.detach().numpy())
    a = t.detach().to(torch.float32).numpy()
    if ggml_type == "F32":
        return np.ascontiguousarray(a)
    if ggml_type == "F16":
        return a.astype(np.float16)
    from gguf import GGMLQuantizationType, quants
    return quants.quantize(a, GGMLQuantizationType.Q8_0)


#: Bytes of one row block of a float table as read (fp16 embeddings: 0.26 GB at 7B, 0.52 GB at 70B).
FLOAT_BLOCK_BYTES = 32 << 20


def _float_row_blocks(model: MergedModel, key: str, shape: tuple[int, int], ggml_type: str) -> Iterator[np.ndarray]:
    """The stored form of float table ``key`` ``[rows, cols]`` (:func:`_float_array`), row block by
    row block: every type stores rows independently (Q8_0 blocks run along a row)."""
    rows, cols = shape
    for start, stop in row_ranges(rows, cols * 2, FLOAT_BLOCK_BYTES):
        yield _float_array(model.read_tensor(key, slice(start, stop)), ggml_type)


class _RowBlocks:
    """A tensor's data as consecutive row blocks, standing in for the ndarray that
    ``GGUFWriter.write_tensor_data`` writes (it needs ``nbytes`` and ``tofile``), so that one block
    is in memory at a time."""

    def __init__(self, nbytes: int, blocks: Callable[[], Iterator[np.ndarray]]):
        self.nbytes = nbytes
        self._blocks = blocks

    @classmethod
    def of(cls, array: np.ndarray) -> "_RowBlocks":
        """One array as a single block."""
        return cls(array.nbytes, lambda: iter((array,)))

    def tofile(self, fout) -> None:
        """Write the blocks to ``fout``, any object with ``write`` (a :class:`DirectWriter`, a file)."""
        written = 0
        for block in self._blocks():
            fout.write(memoryview(np.ascontiguousarray(block).reshape(-1).view(np.uint8)))
            written += block.nbytes
        if written != self.nbytes:
            raise RuntimeError(f"row blocks held {written} bytes, planned {self.nbytes}")


class _Shapes:
    """Tensor shapes from safetensors headers, without reading data."""

    def __init__(self, model: MergedModel):
        self.files = model.base.tensor_files
        self.handles: dict = {}

    def __call__(self, key: str) -> tuple[int, ...]:
        from safetensors import safe_open
        path = self.files[key]
        if path not in self.handles:
            self.handles[path] = safe_open(str(path), framework="pt")
        return tuple(self.handles[path].get_slice(key).get_shape())


def _plan(model: MergedModel, hp: HyperParams, embeddings: str, weights_dtype: str,
          stats: dict[str, Q4_1Stats]) -> list[_Tensor]:
    """Every tensor of the file, in writing order, with lazy producers (one layer in memory at a time)."""
    shape_of = _Shapes(model)
    emb_type, float_type = embeddings.upper(), "F16" if weights_dtype == "f16" else "F32"
    globals_, blocks = [], []

    def perm_for(module: str, rows: int) -> Optional[np.ndarray]:
        heads = spec.qk_heads(module, hp.n_head, hp.n_head_kv) if hp.arch.permute_qk else None
        return None if heads is None else spec.qk_row_permutation(rows, heads)

    def linear(module: str) -> list[_Tensor]:
        stem = "output" if module == "lm_head" else spec.gguf_linear_name(module)
        if stem is None:
            raise UnsupportedModelError(f"quantized module {module} has no llama.cpp tensor name")
        qweight = shape_of(f"{module}.qweight")
        out_f, in_f = qweight[1], qweight[0] * WORD_BITS // model.bits
        perm = perm_for(module, out_f)

        def q4_1() -> np.ndarray:
            # the fold never changes codes: they come packed, straight from qweight (encode_q4_1)
            layer, fold = model.read_layer(module, with_codes=False)
            if (layer.out_features, layer.in_features) != (out_f, in_f):
                raise UnsupportedModelError(f"{module}: decoded shape {tuple(layer.codes.shape)} != header {out_f}x{in_f}")
            check_q4_1_layer(layer)
            blocks_, stats[module] = encode_q4_1(layer, perm, model.read_tensor(f"{module}.qweight").numpy())
            stats[module].fold_shift = fold.max_abs_shift
            return blocks_

        def dense() -> np.ndarray:
            w = model.reference_weight(module)
            return _float_array(w if perm is None else w[torch.from_numpy(perm)], float_type)

        ggml_type = "Q4_1" if weights_dtype == "q4_1" else float_type
        out = [_Tensor(f"{stem}.weight", ggml_type, (out_f, in_f), q4_1 if weights_dtype == "q4_1" else dense)]
        if f"{module}.bias" in shape_of.files:
            def bias() -> np.ndarray:
                b = model.read_tensor(f"{module}.bias").to(torch.float32)
                return (b if perm is None else b[torch.from_numpy(perm)]).numpy()
            out.append(_Tensor(f"{stem}.bias", "F32", (out_f,), bias))
        return out

    def other(key: str) -> list[_Tensor]:
        try:
            name = spec.gguf_tensor_name(key)
        except KeyError:
            raise UnsupportedModelError(f"checkpoint tensor {key} has no llama.cpp equivalent") from None
        if name is None or (name == spec.OUTPUT_TENSOR and hp.tied):
            return []
        shape = shape_of(key)
        if name in (spec.TOKEN_EMBD_TENSOR, spec.OUTPUT_TENSOR):
            ggml_type = emb_type
        elif len(shape) == 1:
            ggml_type = "F32"  # norms and biases
        else:
            ggml_type = float_type if weights_dtype != "q4_1" else "F16"  # a float linear left unquantized
        module = key.rpartition(".")[0]
        perm = perm_for(module, shape[0])

        def produce() -> np.ndarray:
            t = model.read_tensor(key)
            if perm is not None:
                t = t[torch.from_numpy(perm)]
            return _float_array(t, ggml_type)

        def produce_blocks() -> _RowBlocks:  # embedding tables: never whole in memory, widened or not
            return _RowBlocks(_Tensor(name, ggml_type, shape, produce).nbytes,
                              lambda: _float_row_blocks(model, key, shape, ggml_type))
        return [_Tensor(name, ggml_type, shape, produce_blocks if len(shape) == 2 and perm is None else produce)]

    for module in model.quantized_modules:
        (globals_ if module == "lm_head" else blocks).append((module, linear))
    for key in model.other_tensor_names():
        (blocks if key.startswith("model.layers.") else globals_).append((key, other))
    if hp.rope_scaling and hp.rope_scaling["rope_type"] == "llama3":
        factors = llama3_rope_factors(hp)
        globals_.append((None, lambda _: [_Tensor(spec.ROPE_FREQS_TENSOR, "F32", factors.shape, lambda: factors)]))

    def layer_key(item) -> tuple[int, str]:
        parts = item[0].split(".")
        return int(parts[2]), item[0]

    tensors: list[_Tensor] = []
    for key, make in globals_ + sorted(blocks, key=layer_key):
        tensors.extend(make(key))
    names = [t.name for t in tensors]
    if spec.TOKEN_EMBD_TENSOR not in names:
        raise UnsupportedModelError("the checkpoint has no model.embed_tokens.weight")
    if not hp.tied and spec.OUTPUT_TENSOR not in names:
        raise UnsupportedModelError("tie_word_embeddings is false but the checkpoint has no lm_head.weight")
    return tensors


# ------------------------------------------------------------------------------------- export


def _add_metadata(writer, model: MergedModel, hp: HyperParams, weights_dtype: str, embeddings: str, tok,
                  n_vocab: int) -> None:
    from gguf import RopeScalingType

    cfg = model.model_config
    writer.add_type("model")
    writer.add_name(str(cfg.get("_name_or_path") or model.base.directory.name))
    writer.add_file_type(spec.FILE_TYPES[weights_dtype])
    writer.add_quantization_version(spec.QUANTIZATION_VERSION)
    writer.add_vocab_size(n_vocab)  # the embedding's rows (config vocab_size may differ)
    writer.add_context_length(hp.context_length)
    writer.add_embedding_length(hp.hidden)
    writer.add_block_count(hp.n_layer)
    writer.add_feed_forward_length(hp.intermediate)
    writer.add_head_count(hp.n_head)
    writer.add_head_count_kv(hp.n_head_kv)
    writer.add_layer_norm_rms_eps(hp.rms_eps)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_rope_dimension_count(hp.head_dim)
    if hp.head_dim * hp.n_head != hp.hidden:
        writer.add_key_length(hp.head_dim)
        writer.add_value_length(hp.head_dim)
    if hp.rope_scaling and hp.rope_scaling["rope_type"] == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(hp.rope_scaling["factor"]))
    tok.add_to(writer)
    adapter = model.adapter
    writer.add_string(spec.KEY_PREFIX + "weights", weights_dtype)
    writer.add_string(spec.KEY_PREFIX + "embeddings", embeddings)
    writer.add_uint32(spec.KEY_PREFIX + "source_bits", model.bits)
    writer.add_int32(spec.KEY_PREFIX + "source_group_size", model.group_size)
    writer.add_string(spec.KEY_PREFIX + "adapter",
                      "none" if adapter is None else f"rank={adapter.rank} alpha={adapter.alpha:g} pooling={adapter.pooling}")


def export(model: MergedModel, out: Path, *, embeddings: str = "f16", overwrite: bool = False,
           weights_dtype: str = "q4_1", progress: Optional[Callable[[str], None]] = None,
           split_max_bytes: Optional[int] = None) -> dict:
    """Write ``model`` (base with its adapter folded in) as a llama.cpp GGUF file at ``out``.

    Args:
        embeddings: storage of the token embedding (and of ``output.weight`` when untied):
            ``f16`` (default; lossless for fp16 checkpoints), ``f32`` or ``q8_0`` (requantized).
        overwrite: replace an existing ``out``; otherwise an existing file is refused.
        weights_dtype: ``q4_1`` (the folded codes, exact up to fp16 rounding of m) or ``f32``/``f16``
            (the unmerged effective weights ``W_hat + dW``, the noise-floor reference of DESIGN.md §4).
        progress: called with each tensor name as it is written (for the CLI's progress bar).
        split_max_bytes: split the model into files of at most this many tensor bytes (a bigger
            tensor gets a file of its own), as llama.cpp's ``gguf-split`` does: ``out``'s directory
            gets ``<stem>-00001-of-0000N.gguf`` .. (``gguf_spec.split_file_names``), the first
            holding the metadata, each the ``split.*`` keys; llama.cpp loads them from the first.
            A model that fits is written as the one file ``out``.

    Returns:
        JSON-able summary: format, path, files (the split files, or ``[out]``), bytes (all files),
        tensors, quantized_tensors, max_m_rounding (max |fp16(m) - m| over all blocks),
        max_d_rounding, max_fold_shift (code units), tokenizer, notes.

    Raises:
        ConfigError: bad option values. OutputExistsError: ``out`` exists without ``overwrite``.
        FormatLimitError: a layer Q4_1 cannot hold (8-bit, act-order, group size not a multiple of 32).
        UnsupportedModelError: architecture, rope scaling or tokenizer llama.cpp cannot reproduce.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

    from qalora_export.formats.gguf.tokenizer import read_tokenizer

    if embeddings not in spec.EMBEDDING_DTYPES:
        raise ConfigError(f"--embeddings {embeddings!r} is not supported; choose one of {', '.join(spec.EMBEDDING_DTYPES)}")
    if weights_dtype not in spec.WEIGHTS_DTYPES:
        raise ConfigError(f"weights_dtype {weights_dtype!r} is not supported; choose one of {', '.join(spec.WEIGHTS_DTYPES)}")
    if split_max_bytes is not None and (not isinstance(split_max_bytes, int) or split_max_bytes <= 0):
        raise ConfigError(f"--split-max-size {split_max_bytes!r} must be a positive number of bytes (e.g. 2GB)")
    out = Path(out)
    source = str(model.base.directory / "config.json")
    hp = read_hyperparams(model.model_config, source)
    check_tokenizer_matches(model.base, model.tokenizer_dir)
    if weights_dtype == "q4_1":
        preflight_q4_1(model)
    stats: dict[str, Q4_1Stats] = {}
    tensors = _plan(model, hp, embeddings, weights_dtype, stats)
    embd = next(t for t in tensors if t.name == spec.TOKEN_EMBD_TENSOR)
    if embeddings == "q8_0" and embd.shape[1] % spec.QK4_1:
        raise FormatLimitError(f"--embeddings q8_0 needs a hidden size that is a multiple of 32, got {embd.shape[1]}")
    tok = read_tokenizer(model.tokenizer_dir, n_vocab=embd.shape[0])

    # gguf-py's writer plans the split files from the tensor infos (a new file when the next
    # tensor would pass split_max_bytes) before any file is opened; so the file names are known
    # here, and the files are written under temporary names and renamed together.
    writer = GGUFWriter(None, hp.arch.gguf_arch, split_max_size=split_max_bytes or 0)
    _add_metadata(writer, model, hp, weights_dtype, embeddings, tok, embd.shape[0])
    for t in tensors:
        if t.ggml_type in ("Q4_1", "Q8_0"):
            qtype = GGMLQuantizationType[t.ggml_type]
            block, size = GGML_QUANT_SIZES[qtype]
            byte_shape = (*t.shape[:-1], t.shape[-1] // block * size)
            writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), t.nbytes, raw_dtype=qtype)
        else:
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float16 if t.ggml_type == "F16" else np.float32),
                                   t.nbytes)
    files = writer.format_shard_names(out)  # [out], or out's directory / "<stem>-00001-of-0000N.gguf" ..
    if len(files) == 1:
        writer.split_max_size = 0  # one file: no split keys (and no warning from gguf-py that it did not split)
    # a deferred base-fingerprint check (MergedModel.open(defer_fingerprint=True), as the CLI opens
    # it) hashes the base while the tensors are converted; a mismatch removes the output
    with _atomic_gguf_output(out, files, overwrite) as tmp, single_threaded_torch(), model.fingerprint_checked():
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        # the tensor data (GBs) goes around the page cache: each file continues as a DirectWriter
        # where gguf-py's header ends (qalora_export/storage/direct_io.py)
        writer.fout = [_continue_direct(f) for f in writer.fout]
        # tensor i is written by a writer thread while tensor i + 1 is computed (at most 2 in flight)
        behind = WriteBehind(max_in_flight=2, name="qalora-gguf-writer")
        try:
            for t in tensors:
                behind.reserve()
                data = t.produce()
                if data.nbytes != t.nbytes:
                    raise FormatLimitError(f"{t.name}: produced {data.nbytes} bytes, planned {t.nbytes}")
                if isinstance(data, np.ndarray):
                    data = _RowBlocks.of(data)
                behind.submit(functools.partial(_write_tensor_data, writer, data))
                del data
                if progress is not None:
                    progress(t.name)
        except BaseException:
            behind.abort()
            for f in writer.fout:
                f.abort()
            raise
        behind.close()
        writer.close()

    return {
        "format": FORMAT,
        "path": str(out),
        "files": [str(f) for f in files],
        "bytes": sum(f.stat().st_size for f in files),
        "tensors": len(tensors),
        "quantized_tensors": sum(t.ggml_type == "Q4_1" for t in tensors),
        "weights": weights_dtype,
        "embeddings": embeddings,
        "architecture": hp.arch.gguf_arch,
        "max_m_rounding": max((s.max_m_rounding for s in stats.values()), default=0.0),
        "max_d_rounding": max((s.max_d_rounding for s in stats.values()), default=0.0),
        "max_fold_shift": max((s.fold_shift for s in stats.values()), default=0.0),
        "weight_tolerance": WEIGHT_TOLERANCE,
        "tokenizer": {"model": tok.model, "pre": tok.pre, "tokens": len(tok.tokens), "padded": tok.padded,
                      "add_bos": tok.add_bos, "chat_template": tok.chat_template is not None},
        "notes": list(hp.notes),
    }


def _continue_direct(fout) -> DirectWriter:
    """gguf-py's output file (header, metadata and tensor infos written) continued as a
    :class:`DirectWriter` at the same position."""
    fout.flush()
    at, name = fout.tell(), fout.name
    fout.close()
    return DirectWriter(name, at)


def _write_tensor_data(writer, data: "_RowBlocks") -> None:
    """``writer.write_tensor_data(data)``, then close the file it went to if that was its last
    tensor (a split file's buffers are freed as soon as it is complete)."""
    index = next(i for i, infos in enumerate(writer.tensors) if infos)
    writer.write_tensor_data(data)
    if not writer.tensors[index]:
        writer.fout[index].close()


@contextlib.contextmanager
def _atomic_gguf_output(out: Path, files: list[Path], overwrite: bool) -> Iterator[Path]:
    """The path to hand gguf-py's writer: a temporary file for one file, or ``tmp_dir / out.name``
    for split ``files`` (the writer derives their names from it; they move into place together)."""
    if len(files) == 1:
        with atomic_output_file(files[0], overwrite) as tmp:
            yield tmp
        return
    with atomic_output_files(files, overwrite) as tmp_dir:
        yield tmp_dir / out.name


# --------------------------------------------------------------------------------- reading back


def _field(reader, key: str):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def read_weights(path: Path | str) -> Iterator[tuple[str, torch.Tensor]]:
    """Decode the projections of a GGUF file (ours or any llama.cpp LLaMA file) with this project's reader.

    Yields:
        (transformers module name, float64 ``[out, in]`` weight), q/k rows un-permuted back to the
        transformers order. Q4_1 is decoded by :func:`gguf_spec.dequantize_q4_1`; F32/F16 are widened.
    """
    for name, rows in read_weight_rows(path):
        yield name, rows.whole()


def read_weight_rows(path: Path | str) -> Iterator[tuple[str, WeightRows]]:
    """:func:`read_weights` with each weight decoded on demand, a row block at a time (verify).

    Every stored type keeps rows independent (Q4_1 and Q8_0 blocks run along a row), so a block of
    rows decodes alone; the layout (types, shapes, the q/k permutation) is checked on the first
    row before a tensor is yielded.
    """
    from gguf import GGMLQuantizationType

    reader = _open_reader(path)
    try:
        arch = _field(reader, "general.architecture")
        permute = any(a.gguf_arch == arch and a.permute_qk for a in spec.ARCHITECTURES.values())
        n_head = _field(reader, f"{arch}.attention.head_count")
        n_head_kv = _field(reader, f"{arch}.attention.head_count_kv") or n_head
        split_no, split_count = _field(reader, spec.KEY_SPLIT_NO), _field(reader, spec.KEY_SPLIT_COUNT)
    except Exception as exc:  # corrupt metadata values (gguf-py raises several types)
        raise CheckpointError(f"{path}: GGUF metadata cannot be decoded ({type(exc).__name__}: {exc})") from exc
    readers = [reader] + [_open_reader(p) for p in _other_splits(Path(path), split_no, split_count)]
    for t in (t for r in readers for t in r.tensors):
        module = spec.hf_linear_name(t.name)
        if module is None and t.name == spec.OUTPUT_TENSOR and t.tensor_type == GGMLQuantizationType.Q4_1:
            module = "lm_head"
        if module is None:
            continue
        heads = spec.qk_heads(module, n_head, n_head_kv) if permute else None
        yield module, _tensor_rows(path, t, heads)


def _other_splits(first: Path, split_no, split_count) -> list[Path]:
    """The files after ``first`` of a split model (none for a single file)."""
    if not split_count or split_count == 1:
        return []
    if split_no != 0:
        raise CheckpointError(f"{first} is file {split_no + 1} of a model split in {split_count}; pass its first "
                              f"file (...{spec.SPLIT_SUFFIX.format(no=1, count=split_count)})")
    paths = spec.split_paths(first, split_count)
    if paths is None:
        raise CheckpointError(f"{first} is the first of {split_count} split files but is not named "
                              f"<prefix>{spec.SPLIT_SUFFIX.format(no=1, count=split_count)}, so the others cannot be "
                              f"found; keep the names llama.cpp's gguf-split gives them")
    return paths[1:]


def _tensor_rows(path: Path | str, t, heads: Optional[int]) -> WeightRows:
    """A GGUF tensor's weight as row blocks; ``heads``: undo llama.cpp's q/k row permutation."""
    def decode(rows) -> np.ndarray:  # rows: a slice or an index array of stored rows
        try:
            return _dequantize_rows(data[rows], t.tensor_type)
        except Exception as exc:  # shape/type inconsistencies of a corrupt file (ValueError, TypeError, ...)
            raise _undecodable(path, t, exc) from exc

    try:
        data = np.asarray(t.data)
    except Exception as exc:
        raise _undecodable(path, t, exc) from exc
    first = decode(slice(0, 1) if data.ndim else ())  # the layout, checked on one row
    if first.ndim != 2:
        raise CheckpointError(f"{path}: tensor {t.name} is {first.ndim}-D, expected a 2-D weight; the file is corrupt")
    n_rows = data.shape[0]
    order = None
    if heads is not None:
        try:
            order = np.argsort(spec.qk_row_permutation(n_rows, heads))  # transformers row r = stored row order[r]
        except ValueError as exc:
            raise _undecodable(path, t, exc) from exc

    def rows(start: int, stop: int) -> torch.Tensor:
        w = decode(slice(start, stop) if order is None else order[start:stop])
        if not np.isfinite(w).all():
            raise CheckpointError(f"{path}: tensor {t.name} decodes to NaN or inf; the file is corrupt")
        return torch.from_numpy(np.ascontiguousarray(w))
    return WeightRows((n_rows, int(first.shape[1])), rows)


def _undecodable(path: Path | str, t, exc: Exception) -> CheckpointError:
    return CheckpointError(
        f"{path}: tensor {t.name} ({getattr(t.tensor_type, 'name', t.tensor_type)}, shape "
        f"{list(t.shape)}) cannot be decoded ({type(exc).__name__}: {exc}); the file is corrupt")


def _dequantize_rows(data: np.ndarray, tensor_type) -> np.ndarray:
    """float64 rows of stored GGUF rows ``data`` (Q4_1 by our reader, floats widened, others by gguf-py)."""
    from gguf import GGMLQuantizationType, quants

    if tensor_type == GGMLQuantizationType.Q4_1:
        return spec.dequantize_q4_1(data)
    if tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        return data.astype(np.float64)
    return quants.dequantize(data, tensor_type).astype(np.float64)


def _open_reader(path: Path | str):
    """gguf-py's reader, its many exception types for a damaged file turned into CheckpointError."""
    from gguf import GGUFReader

    if not Path(path).is_file():
        raise CheckpointError(f"GGUF file {path} does not exist")
    # Walk the header first with our bounded scan: gguf-py reads past the end of the file as empty
    # arrays, so a damaged array count makes it loop (up to 2**64 times) instead of failing.
    read_file_types(path)
    try:
        return GGUFReader(str(path))
    except Exception as exc:  # ValueError, IndexError, KeyError, UnicodeDecodeError, struct errors, ...
        raise CheckpointError(
            f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc}); it is truncated or corrupt, "
            f"export it again") from exc


def read_file_types(path: Path | str) -> tuple[str, str]:
    """(weights_dtype, embeddings) of a GGUF file, as ``export`` options that reproduce them."""
    from gguf import GGMLQuantizationType

    try:
        types = {k: GGMLQuantizationType(v).name.lower()
                 for p in spec.split_paths(Path(path)) or [path] for k, v in spec.scan_tensor_types(p).items()}
    except OSError as exc:
        raise CheckpointError(f"cannot read GGUF file {exc.filename or path}: {exc.strerror or exc}") from exc
    except Exception as exc:  # bad magic, truncated header, unknown value or tensor types
        raise CheckpointError(
            f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc}); it is truncated or corrupt") from exc
    emb = types.get(spec.TOKEN_EMBD_TENSOR, "f16")
    weights = next((v for k, v in types.items() if spec.hf_linear_name(k)), "q4_1")
    return weights, emb


# ------------------------------------------------------------------------------ runtime verify


# Hold the dequantized weights of the reference model between forwards (greedy decoding runs one
# forward per new token, and QALoRALinear dequantizes every weight at every forward) when they fit.
DEQUANT_CACHE_BYTES = 4 << 30


def _hold_dequantized_weights(net: torch.nn.Module) -> None:
    """Compute each QALoRALinear's ``W_hat`` once (same bits as every forward would) and reuse it."""
    from qalora_export.modeling.qalora_linear import QALoRALinear

    layers = [m for m in net.modules() if isinstance(m, QALoRALinear)]
    if sum(m.in_features * m.out_features * 4 for m in layers) > DEQUANT_CACHE_BYTES:
        return
    for module in layers:
        w = module.dequantized_weight(module.compute_dtype)
        module.dequantized_weight = lambda dtype=None, _w=w, _m=module: _w if dtype in (None, _m.compute_dtype) else _w.to(dtype)


def _run_torch(net: torch.nn.Module, prompts: list[list[int]], n_new: int) -> tuple[list[np.ndarray], list[list[int]]]:
    logits, continuations = [], []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt], dtype=torch.long)
            logits.append(net(input_ids=ids).logits[0].float().numpy())
            generated: list[int] = []
            for _ in range(n_new):
                token = int(net(input_ids=ids).logits[0, -1].argmax())
                generated.append(token)
                ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
            continuations.append(generated)
    return logits, continuations


def _torch_references(model: MergedModel, prompts: list[list[int]], n_new: int, base_too: bool = True):
    """Logits ``[T, V]`` and greedy continuations of the unmerged PyTorch model (float32, CPU), with the
    adapter and (``base_too``) without it: one model, whose ``lora_B`` is zeroed for the second run, so
    the adapter path adds exactly 0 and the output is the base's."""
    from qalora_export.modeling.model import build_model, qalora_modules

    net = build_model(model.base, model.adapter)
    _hold_dequantized_weights(net)
    with_adapter = _run_torch(net, prompts, n_new)
    base = with_adapter
    if base_too and model.adapter is not None:
        with torch.no_grad():
            for module in qalora_modules(net).values():
                module.lora_B.zero_()
        base = _run_torch(net, prompts, n_new)
    del net
    return with_adapter, base


def _llamacpp_logits_and_greedy(path: Path, prompts: list[list[int]], n_new: int,
                                n_threads: int) -> tuple[list[np.ndarray], list[list[int]]]:
    from qalora_export.formats.gguf.runtime import run_logits_and_greedy

    return run_logits_and_greedy(path, prompts, n_new, n_threads=n_threads)


def _compare(ref_logits, ref_greedy, test_logits, test_greedy) -> dict:
    from qalora_export.runtimes.compare import compare_logits, greedy_match

    overall = compare_logits(ref_logits, test_logits).to_json()
    overall["greedy_match"] = greedy_match(ref_greedy, test_greedy)
    overall["greedy_identical"] = sum(a == b for a, b in zip(ref_greedy, test_greedy)) / max(len(ref_greedy), 1)
    per_prompt = []
    for k in range(len(ref_logits)):
        row = compare_logits([ref_logits[k]], [test_logits[k]]).to_json()
        row["greedy_match"] = greedy_match([ref_greedy[k]], [test_greedy[k]])
        row["greedy_reference"], row["greedy_test"] = ref_greedy[k], test_greedy[k]
        per_prompt.append(row)
    overall["per_prompt"] = per_prompt
    return overall


def verify_runtime(model: MergedModel, artifact: Path, prompts: list[list[int]], workdir: Path, *,
                   n_new: int = 8, n_threads: int = 2) -> dict:
    """Run the artifact in llama.cpp and judge it against llama.cpp's own noise floor (DESIGN.md §4).

    Three llama.cpp runs, each compared with the PyTorch model it should equal:

    - ``artifact``: the GGUF under test vs the unmerged model (base + adapter);
    - ``floor``: the base exported the same way (same weight and embedding types) with no adapter, so
      the fold is the identity, vs the PyTorch base: the distance llama.cpp itself adds;
    - ``f32_reference``: an F32 GGUF of the unmerged effective weights vs the unmerged model: what is
      left without weight and activation quantization (graph and float32 differences only).

    ``passed`` is ``artifact.mean_kl <= KL_FLOOR_FACTOR * floor.mean_kl + KL_EPSILON`` (gguf_spec.py).
    Greedy continuations (``n_new`` tokens) are reported, not gated: near-ties flip under activation
    quantization (DESIGN.md §8).
    """
    from qalora_export.runtimes.compare import within_floor

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    artifact = Path(artifact)
    weights_dtype, embeddings = read_file_types(artifact)
    if weights_dtype not in spec.WEIGHTS_DTYPES or embeddings not in spec.EMBEDDING_DTYPES:
        raise ConfigError(f"{artifact}: projections stored as {weights_dtype}, embeddings as {embeddings}; "
                          f"verify knows {spec.WEIGHTS_DTYPES} / {spec.EMBEDDING_DTYPES}")

    (ref_logits, ref_greedy), (base_logits, base_greedy) = _torch_references(model, prompts, n_new)
    art_logits, art_greedy = _llamacpp_logits_and_greedy(artifact, prompts, n_new, n_threads)
    result = {"artifact": _compare(ref_logits, ref_greedy, art_logits, art_greedy)}

    f32_path = workdir / "reference-f32.gguf"
    export(model, f32_path, embeddings="f32", weights_dtype="f32", overwrite=True)
    f32_logits, f32_greedy = _llamacpp_logits_and_greedy(f32_path, prompts, n_new, n_threads)
    result["f32_reference"] = _compare(ref_logits, ref_greedy, f32_logits, f32_greedy)
    f32_path.unlink()

    floor_path = workdir / f"floor-base-{weights_dtype}.gguf"
    export(MergedModel(model.base, None), floor_path, embeddings=embeddings, weights_dtype=weights_dtype,
           overwrite=True)
    floor_logits, floor_greedy = _llamacpp_logits_and_greedy(floor_path, prompts, n_new, n_threads)
    result["floor"] = _compare(base_logits, base_greedy, floor_logits, floor_greedy)
    floor_path.unlink()

    art_kl, floor_kl = result["artifact"]["mean_kl"], result["floor"]["mean_kl"]
    result["rule"] = (f"artifact mean KL <= {spec.KL_FLOOR_FACTOR:g} x floor mean KL + {spec.KL_EPSILON:g} "
                      f"(floor: base with no adapter, same GGUF types, in llama.cpp vs PyTorch)")
    result["allowed_mean_kl"] = spec.KL_FLOOR_FACTOR * floor_kl + spec.KL_EPSILON
    result["kl_over_floor"] = art_kl / floor_kl if floor_kl > 0 else None
    result["passed"] = bool(within_floor(art_kl, floor_kl, spec.KL_FLOOR_FACTOR, spec.KL_EPSILON))
    result["weights"], result["embeddings"], result["prompts"], result["n_new"] = weights_dtype, embeddings, len(prompts), n_new
    return result
