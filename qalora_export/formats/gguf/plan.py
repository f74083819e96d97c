"""The tensors of the output file, in llama.cpp's names and order: each a name, a ggml type, a shape
and a producer of its data (Q4_1 blocks, float row blocks), so that the writer streams one tensor at a
time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from qalora_export.checkpoint.merged_view import MergedView
from qalora_export.core.packing import WORD_BITS
from qalora_export.core.weight_rows import row_ranges
from qalora_export.errors import UnsupportedModelError
from qalora_export.formats.gguf import spec as spec
from qalora_export.formats.gguf.encode import Q4_1Stats, _Shapes, check_q4_1_layer, encode_q4_1
from qalora_export.formats.gguf.hparams import HyperParams, llama3_rope_factors

# ----------------------------------------------------------------------------------- the plan


@dataclass
class _Tensor:
    """One tensor of the output file: its name, stored type and how to produce its data."""

    name: str
    ggml_type: str  # "Q4_1", "Q8_0", "Q6_K", "F16", "F32"
    shape: tuple[int, int] | tuple[int]  # logical [rows, cols] (numpy order) or [n]
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        n = int(np.prod(self.shape))
        if self.ggml_type == "Q4_1":
            return n // spec.QK4_1 * spec.Q4_1_BLOCK_BYTES
        if self.ggml_type in ("Q8_0", "Q6_K"):
            from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType[self.ggml_type]]
            return n // block * size
        return n * (2 if self.ggml_type == "F16" else 4)


def _float_array(t: torch.Tensor, ggml_type: str) -> np.ndarray:
    """A float tensor as the stored array: F32, F16, Q8_0 blocks (gguf-py's reference quantizer) or
    Q6_K blocks (``kquant.py``)."""
    if ggml_type == "F16" and t.dtype == torch.float16 and not bool(torch.isnan(t).any()):
        # fp16 -> fp32 -> fp16 is the identity on every value but NaN payloads: keep the bytes
        return np.ascontiguousarray(t.detach().numpy())
    a = t.detach().to(torch.float32).numpy()
    if ggml_type == "F32":
        return np.ascontiguousarray(a)
    if ggml_type == "F16":
        return a.astype(np.float16)
    if ggml_type == "Q6_K":  # kquant.py: our own encoder (gguf-py has none)
        from qalora_export.formats.gguf.kquant import quantize_q6_k
        return quantize_q6_k(a)
    from gguf import GGMLQuantizationType, quants
    return quants.quantize(a, GGMLQuantizationType.Q8_0)


#: Bytes of one row block of a float table as read (fp16 embeddings: 0.26 GB at 7B, 0.52 GB at 70B).
FLOAT_BLOCK_BYTES = 32 << 20


def _float_row_blocks(model: MergedView, key: str, shape: tuple[int, int], ggml_type: str) -> Iterator[np.ndarray]:
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


def _plan(model: MergedView, hp: HyperParams, embeddings: str, weights_dtype: str,
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
            _check_bias_allowed(module, hp)
            def bias() -> np.ndarray:
                b = model.read_tensor(f"{module}.bias").to(torch.float32)
                return (b if perm is None else b[torch.from_numpy(perm)]).numpy()
            out.append(_Tensor(f"{stem}.bias", "F32", (out_f,), bias))
        return out

    def other(key: str) -> list[_Tensor]:
        try:
            name = spec.gguf_tensor_name(key, hp.arch)
        except KeyError:
            raise UnsupportedModelError(
                f"checkpoint tensor {key} has no equivalent in llama.cpp's {hp.arch.gguf_arch} graph") from None
        if name is None or (name == spec.OUTPUT_TENSOR and hp.tied):
            return []
        module, _, suffix = key.rpartition(".")
        if suffix == "bias":
            _check_bias_allowed(module, hp)
        shape = shape_of(key)
        if name in (spec.TOKEN_EMBD_TENSOR, spec.OUTPUT_TENSOR):
            ggml_type = emb_type
        elif len(shape) == 1:
            ggml_type = "F32"  # norms and biases
        else:
            ggml_type = float_type if weights_dtype != "q4_1" else "F16"  # a float linear left unquantized
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
    _check_block_tensors(names, hp)
    if spec.TOKEN_EMBD_TENSOR not in names:
        raise UnsupportedModelError("the checkpoint has no model.embed_tokens.weight")
    if not hp.tied and spec.OUTPUT_TENSOR not in names:
        raise UnsupportedModelError("tie_word_embeddings is false but the checkpoint has no lm_head.weight")
    return tensors


def _check_bias_allowed(module: str, hp: HyperParams) -> None:
    """Refuse a projection bias that llama.cpp's graph for this architecture does not add."""
    leaf = module.split(".", 3)[-1] if module.startswith("model.layers.") else module
    if leaf not in hp.arch.biases:
        raise UnsupportedModelError(
            f"{module}.bias: llama.cpp's {hp.arch.gguf_arch} graph has no bias for this projection "
            f"(it adds biases to {', '.join(b.rsplit('.', 1)[-1] for b in hp.arch.biases) or 'none'}), so the "
            f"model would run without it; this model cannot be exported to GGUF")


def _check_block_tensors(names: list[str], hp: HyperParams) -> None:
    """Every per-layer tensor the architecture requires (qwen3's q/k norms) is in the checkpoint."""
    for _, gguf_name in hp.arch.block_tensors:
        missing = [i for i in range(hp.n_layer) if f"blk.{i}.{gguf_name}" not in names]
        if missing:
            raise UnsupportedModelError(
                f"llama.cpp's {hp.arch.gguf_arch} graph needs blk.N.{gguf_name} in every layer, but the checkpoint "
                f"has none for layers {missing[:8]}; the base is not a complete {hp.arch.gguf_arch} model")
