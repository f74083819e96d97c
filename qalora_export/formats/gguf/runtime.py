"""Running a GGUF file in llama.cpp (llama-cpp-python): logits for fixed token ids, greedy decoding.

Prompts are token ids, never text, so that llama.cpp and the PyTorch reference see exactly the
same input whatever their tokenizers do. ``llama_cpp`` is imported inside the functions: importing
this module does not load the runtime.

llama.cpp is native code that can crash (a build with native CPU flags segfaults in decode on CPUs
that advertise AMX): each public function runs its work in a child process
(:mod:`.isolation`), so that a crash is a :class:`~qalora_export.errors.RuntimeCrashError` naming
the signal and the fix, never the death of the caller.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from qalora_export.errors import ConfigError
from qalora_export.runtimes.isolation import RuntimeInfo, call_isolated
from qalora_export.runtimes.prompts import check_prompt_ids

RUNTIME = RuntimeInfo(
    name="llama.cpp (llama-cpp-python)",
    crash_hint=("llama-cpp-python built with native CPU flags crashes on CPUs that advertise AMX (and a build from "
                "another CPU may use instructions this one lacks); reinstall it built for any x86-64 CPU: "
                "`python scripts/install_llama_cpp.py` in a qalora-export source tree, or "
                "CMAKE_ARGS=\"-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON\" "
                "pip install --force-reinstall --no-cache-dir llama-cpp-python"))
# A call that runs past this is a hang (the fixture's verify runs take seconds).
DEFAULT_TIMEOUT_S = 900.0


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



def _isolated(function: str, timeout: Optional[float], **kwargs):
    return call_isolated(f"{__name__}:{function}", kwargs, RUNTIME,
                         timeout=DEFAULT_TIMEOUT_S if timeout is None else timeout)


def run_logits(gguf_path: Path | str, prompts: list[list[int]], n_threads: int = 2,
               timeout: Optional[float] = None) -> list[np.ndarray]:
    """llama.cpp's logits for every position of every prompt (in a child process).

    Returns:
        one float32 array ``[len(prompt), vocab]`` per prompt (position t predicts token t + 1).

    Raises:
        RuntimeCrashError: llama.cpp crashed, or ran past ``timeout`` seconds (default
            ``DEFAULT_TIMEOUT_S``).
    """
    return _isolated("_run_logits_here", timeout, gguf_path=str(gguf_path),
                     prompts=[[int(t) for t in p] for p in prompts], n_threads=n_threads)


def greedy(gguf_path: Path | str, prompt_ids: list[int], n_new: int, n_threads: int = 2,
           timeout: Optional[float] = None) -> list[int]:
    """The ``n_new`` tokens llama.cpp generates after ``prompt_ids`` by argmax (no sampling, no stop),
    in a child process."""
    return _isolated("_greedy_here", timeout, gguf_path=str(gguf_path), prompt_ids=[int(t) for t in prompt_ids],
                     n_new=n_new, n_threads=n_threads)


def run_logits_and_greedy(gguf_path: Path | str, prompts: list[list[int]], n_new: int, n_threads: int = 2,
                          timeout: Optional[float] = None) -> tuple[list[np.ndarray], list[list[int]]]:
    """:func:`run_logits` and :func:`greedy` of every prompt, in one child process."""
    logits, continuations = _isolated("_logits_and_greedy_here", timeout, gguf_path=str(gguf_path),
                                      prompts=[[int(t) for t in p] for p in prompts], n_new=n_new,
                                      n_threads=n_threads)
    return logits, continuations


def tokenize(gguf_path: Path | str, text: str, add_special: bool = False, parse_special: bool = False,
             timeout: Optional[float] = None) -> list[int]:
    """Token ids llama.cpp's own tokenizer (from the file's ``tokenizer.ggml.*``) gives ``text``
    (in a child process)."""
    return _isolated("_tokenize_here", timeout, gguf_path=str(gguf_path), text=text, add_special=add_special,
                     parse_special=parse_special)


def ggml_dequantize_q4_1(blocks: np.ndarray, timeout: Optional[float] = None) -> np.ndarray:
    """Dequantize Q4_1 blocks with ggml's own C routine (``dequantize_row_q4_1`` in libggml-base),
    in a child process.

    Args:
        blocks: uint8 ``[rows, nb * 20]`` as stored in a GGUF file.

    Returns:
        float32 ``[rows, nb * 32]``: exactly what llama.cpp's kernels start from.
    """
    return _isolated("_ggml_dequantize_q4_1_here", timeout, blocks=np.ascontiguousarray(blocks, dtype=np.uint8))


def _run_logits_here(gguf_path: str, prompts: list[list[int]], n_threads: int = 2) -> list[np.ndarray]:
    if not prompts:
        return []
    with open_model(gguf_path, n_ctx=max(len(p) for p in prompts), n_threads=n_threads, logits_all=True) as llm:
        return [_logits(llm, prompt, f"prompt {k}") for k, prompt in enumerate(prompts)]


def _logits_and_greedy_here(gguf_path: str, prompts: list[list[int]], n_new: int,
                            n_threads: int = 2) -> tuple[list[np.ndarray], list[list[int]]]:
    if not prompts:
        return [], []
    # one model for every prompt and both runs: loading it (a 150k-token vocabulary) costs more than the runs
    with open_model(gguf_path, n_ctx=max(len(p) for p in prompts) + n_new, n_threads=n_threads,
                    logits_all=True) as llm:
        logits = [_logits(llm, prompt, f"prompt {k}") for k, prompt in enumerate(prompts)]
        return logits, [_greedy(llm, prompt, n_new) for prompt in prompts]


def _greedy_here(gguf_path: str, prompt_ids: list[int], n_new: int, n_threads: int = 2) -> list[int]:
    with open_model(gguf_path, n_ctx=len(prompt_ids) + n_new, n_threads=n_threads, logits_all=True) as llm:
        return _greedy(llm, prompt_ids, n_new)


def _logits(llm, prompt: list[int], label: str) -> np.ndarray:
    """Logits ``[len(prompt), vocab]`` of ``prompt`` evaluated from an empty context."""
    ids = check_prompt_ids(prompt, llm.n_vocab(), label)
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32, copy=True)


def _greedy(llm, prompt_ids: list[int], n_new: int) -> list[int]:
    """``n_new`` argmax tokens after ``prompt_ids``, from an empty context."""
    ids = check_prompt_ids(prompt_ids, llm.n_vocab(), "greedy prompt")
    llm.reset()
    llm.eval(ids)
    generated: list[int] = []
    for _ in range(n_new):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        generated.append(token)
        llm.eval([token])
    return generated


def _tokenize_here(gguf_path: str, text: str, add_special: bool = False, parse_special: bool = False) -> list[int]:
    cases = [{"text": text, "add_special": add_special, "parse_special": parse_special}]
    return _tokenize_cases_here(gguf_path, cases, with_vocab=False)["ids"][0]


def tokenize_cases(gguf_path: Path | str, cases: list[dict], timeout: Optional[float] = None) -> dict:
    """llama.cpp's tokenizer of the file on many texts, the vocabulary loaded once (in a child process).

    Args:
        cases: ``{"text": str, "add_special": bool, "parse_special": bool}`` each (``add_special``:
            add BOS/EOS as the file says; ``parse_special``: match control tokens in the text).

    Returns:
        ``{"ids": [token ids per case], "vocab": {...}}``, ``vocab`` being what llama.cpp made of the
        file's ``tokenizer.ggml.*`` keys, defaults included: ``type`` (1 SPM, 2 BPE), ``n_tokens``,
        the ``bos``/``eos``/``eot``/``sep``/``nl``/``pad`` ids (-1: none) and ``add_bos``/``add_eos``/``add_sep``.
    """
    cases = [{"text": str(c["text"]), "add_special": bool(c.get("add_special", False)),
              "parse_special": bool(c.get("parse_special", False))} for c in cases]
    return _isolated("_tokenize_cases_here", timeout, gguf_path=str(gguf_path), cases=cases)


def _tokenize_cases_here(gguf_path: str, cases: list[dict], with_vocab: bool = True) -> dict:
    import llama_cpp
    from llama_cpp import Llama
    from llama_cpp._utils import suppress_stdout_stderr

    path = Path(gguf_path)
    if not path.is_file():
        raise ConfigError(f"GGUF file {path} does not exist")
    with suppress_stdout_stderr(disable=False):  # a vocab-only context still warns about n_ctx_train = 0
        llm = Llama(str(path), vocab_only=True, verbose=False)
    try:
        ids = [list(llm.tokenize(c["text"].encode("utf-8"), add_bos=c["add_special"], special=c["parse_special"]))
               for c in cases]
        if not with_vocab:
            return {"ids": ids}
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        facts = {"type": int(llama_cpp.llama_vocab_type(vocab)), "n_tokens": int(llama_cpp.llama_vocab_n_tokens(vocab))}
        for kind in ("bos", "eos", "eot", "sep", "nl", "pad"):
            facts[kind] = int(getattr(llama_cpp, f"llama_vocab_{kind}")(vocab))
        for kind in ("add_bos", "add_eos", "add_sep"):
            facts[kind] = bool(getattr(llama_cpp, f"llama_vocab_get_{kind}")(vocab))
        return {"ids": ids, "vocab": facts}
    finally:
        llm.close()


def _ggml_dequantize_q4_1_here(blocks: np.ndarray) -> np.ndarray:
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
