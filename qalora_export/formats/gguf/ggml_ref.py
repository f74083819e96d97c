"""ggml's own C quantizers and dequantizers (llama-cpp-python's ``libggml-base``), for checking this
project's encoders against the code llama.cpp runs. Each call runs in a child process
(``runtime.RUNTIME``): native code that crashes never takes the caller with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from qalora_export.errors import ConfigError

#: ggml types with a reference row quantizer / dequantizer exported by libggml-base (name -> C suffix)
TYPES = {"Q4_1": "q4_1", "Q8_0": "q8_0", "Q6_K": "q6_K"}


def ggml_quantize(x: np.ndarray, ggml_type: str, timeout: Optional[float] = None) -> np.ndarray:
    """``quantize_row_<type>_ref`` of float rows ``[rows, cols]``: uint8 ``[rows, cols / block * bytes]``."""
    return _call("_quantize_here", timeout, x=np.ascontiguousarray(x, dtype=np.float32), ggml_type=ggml_type)


def ggml_dequantize(blocks: np.ndarray, ggml_type: str, timeout: Optional[float] = None) -> np.ndarray:
    """``dequantize_row_<type>`` of stored rows uint8 ``[rows, nbytes]``: float32 ``[rows, cols]``."""
    return _call("_dequantize_here", timeout, blocks=np.ascontiguousarray(blocks, dtype=np.uint8), ggml_type=ggml_type)


def _call(function: str, timeout: Optional[float], **kwargs):
    from qalora_export.formats.gguf.runtime import DEFAULT_TIMEOUT_S, RUNTIME
    from qalora_export.runtimes.isolation import call_isolated

    return call_isolated(f"{__name__}:{function}", kwargs, RUNTIME,
                         timeout=DEFAULT_TIMEOUT_S if timeout is None else timeout)


def _lib():
    import ctypes

    import llama_cpp

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    candidates = sorted(lib_dir.glob("libggml-base.*")) + sorted(lib_dir.glob("ggml-base.*"))
    if not candidates:
        raise ConfigError(f"libggml-base is not in {lib_dir}; llama-cpp-python was built without shared ggml")
    return ctypes.CDLL(str(candidates[0]))


def _sizes(ggml_type: str) -> tuple[int, int, str]:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if ggml_type not in TYPES:
        raise ConfigError(f"no ggml reference routine for {ggml_type}; known: {', '.join(TYPES)}")
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[ggml_type]]
    return block, size, TYPES[ggml_type]


def _quantize_here(x: np.ndarray, ggml_type: str) -> np.ndarray:
    import ctypes

    block, size, suffix = _sizes(ggml_type)
    fn = getattr(_lib(), f"quantize_row_{suffix}_ref")
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    fn.restype = None
    src = np.ascontiguousarray(x, dtype=np.float32)
    rows, cols = src.shape
    if cols % block:
        raise ConfigError(f"{ggml_type} rows must be a multiple of {block} values, got {cols}")
    out = np.empty((rows, cols // block * size), dtype=np.uint8)
    fn(src.ctypes.data, out.ctypes.data, src.size)  # rows are contiguous: one call for the whole table
    return out


def _dequantize_here(blocks: np.ndarray, ggml_type: str) -> np.ndarray:
    import ctypes

    block, size, suffix = _sizes(ggml_type)
    fn = getattr(_lib(), f"dequantize_row_{suffix}")
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    fn.restype = None
    src = np.ascontiguousarray(blocks, dtype=np.uint8)
    rows, nbytes = src.shape
    out = np.empty((rows, nbytes // size * block), dtype=np.float32)
    fn(src.ctypes.data, out.ctypes.data, out.size)
    return out
