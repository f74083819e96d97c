"""Running a GGUF file in llama.cpp (llama-cpp-python): logits for fixed token ids, greedy decoding.

Prompts are token ids, never text, so that llama.cpp and the PyTorch reference see exactly the
same input whatever their tokenizers do. ``llama_cpp`` is imported inside the functions: importing
this module does not load the runtime.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..errors import ConfigError


@contextlib.contextmanager
def open_model(gguf_path: Path | str, n_ctx: int, n_threads: int = 2, logits_all: bool = True,
               n_batch: int = 512) -> Iterator[object]:
    """A ``llama_cpp.Llama`` for ``gguf_path``, closed on exit. ``n_ctx`` bounds prompt + generation."""
    from llama_cpp import Llama

    path = Path(gguf_path)
    if not path.is_file():
        raise ConfigError(f"GGUF file {path} does not exist")
    try:
        llm = Llama(str(path), n_ctx=max(int(n_ctx), 8), n_batch=n_batch, n_threads=n_threads,
                    n_threads_batch=n_threads, logits_all=logits_all, verbose=False)
    except ValueError as exc:  # llama-cpp-python's "Failed to load model from file"
        raise ConfigError(f"llama.cpp cannot load {path}: {exc}") from exc
    try:
        yield llm
    finally:
        llm.close()


def _check_ids(prompt: Sequence[int], n_vocab: int, where: str) -> list[int]:
    ids = [int(t) for t in prompt]
    if not ids:
        raise ConfigError(f"{where}: empty prompt; give at least one token id")
    bad = [t for t in ids if t < 0 or t >= n_vocab]
    if bad:
        raise ConfigError(f"{where}: token id {bad[0]} is outside the model's vocabulary of {n_vocab}")
    return ids


def run_logits(gguf_path: Path | str, prompts: list[list[int]], n_threads: int = 2) -> list[np.ndarray]:
    """llama.cpp's logits for every position of every prompt.

    Returns:
        one float32 array ``[len(prompt), vocab]`` per prompt (position t predicts token t + 1).
    """
    if not prompts:
        return []
    n_ctx = max(len(p) for p in prompts)
    out = []
    with open_model(gguf_path, n_ctx=n_ctx, n_threads=n_threads, logits_all=True) as llm:
        n_vocab = llm.n_vocab()
        for k, prompt in enumerate(prompts):
            ids = _check_ids(prompt, n_vocab, f"prompt {k}")
            llm.reset()
            llm.eval(ids)
            out.append(np.array(llm.scores[: len(ids)], dtype=np.float32, copy=True))
    return out


def greedy(gguf_path: Path | str, prompt_ids: list[int], n_new: int, n_threads: int = 2) -> list[int]:
    """The ``n_new`` tokens llama.cpp generates after ``prompt_ids`` by argmax (no sampling, no stop)."""
    with open_model(gguf_path, n_ctx=len(prompt_ids) + n_new, n_threads=n_threads, logits_all=True) as llm:
        ids = _check_ids(prompt_ids, llm.n_vocab(), "greedy prompt")
        llm.reset()
        llm.eval(ids)
        generated: list[int] = []
        for _ in range(n_new):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            generated.append(token)
            llm.eval([token])
        return generated


def tokenize(gguf_path: Path | str, text: str, add_special: bool = False, parse_special: bool = False) -> list[int]:
    """Token ids llama.cpp's own tokenizer (from the file's ``tokenizer.ggml.*``) gives ``text``."""
    from llama_cpp import Llama
    from llama_cpp._utils import suppress_stdout_stderr

    path = Path(gguf_path)
    with suppress_stdout_stderr(disable=False):  # a vocab-only context still warns about n_ctx_train = 0
        llm = Llama(str(path), vocab_only=True, verbose=False)
    try:
        return list(llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=parse_special))
    finally:
        llm.close()


def ggml_dequantize_q4_1(blocks: np.ndarray) -> np.ndarray:
    """Dequantize Q4_1 blocks with ggml's own C routine (``dequantize_row_q4_1`` in libggml-base).

    Args:
        blocks: uint8 ``[rows, nb * 20]`` as stored in a GGUF file.

    Returns:
        float32 ``[rows, nb * 32]``: exactly what llama.cpp's kernels start from.
    """
    import ctypes

    import llama_cpp
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType.Q4_1]
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    candidates = sorted(lib_dir.glob("libggml-base.*")) + sorted(lib_dir.glob("ggml-base.*"))
    if not candidates:
        raise ConfigError(f"libggml-base is not in {lib_dir}; llama-cpp-python was built without shared ggml")
    lib = ctypes.CDLL(str(candidates[0]))
    fn = lib.dequantize_row_q4_1
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    fn.restype = None
    src = np.ascontiguousarray(blocks, dtype=np.uint8)
    rows, nbytes = src.shape
    out = np.empty((rows, nbytes // block_bytes * block), dtype=np.float32)
    fn(src.ctypes.data, out.ctypes.data, out.size)  # rows are contiguous: one call for the whole tensor
    return out
