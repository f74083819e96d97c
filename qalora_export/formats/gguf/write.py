"""GGUF export: a complete llama.cpp model (hyperparameters, tokenizer, chat template, tensors), written
with gguf-py's writer (the only module that drives it), one tensor at a time, atomically.

``weights_dtype="f32"``/``"f16"`` writes the unmerged effective weights ``W_hat + dW`` as floats
instead: the reference file of docs/design.md §4 (and a way to run any base in llama.cpp unquantized).
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np

from qalora_export.checkpoint.merged_view import MergedView, single_threaded_torch
from qalora_export.checkpoint.tokenizer_check import check_tokenizer_matches
from qalora_export.errors import ConfigError, FormatLimitError
from qalora_export.formats.gguf import spec as spec
from qalora_export.formats.gguf.encode import Q4_1Stats, preflight_q4_1
from qalora_export.formats.gguf.hparams import HyperParams, read_hyperparams
from qalora_export.formats.gguf.plan import _plan, _RowBlocks
from qalora_export.formats.gguf.spec import WEIGHT_TOLERANCE
from qalora_export.storage.atomic import atomic_output_file, atomic_output_files
from qalora_export.storage.direct_io import DirectWriter
from qalora_export.storage.write_behind import WriteBehind

# ------------------------------------------------------------------------------------- export


def _add_metadata(writer, model: MergedView, hp: HyperParams, weights_dtype: str, embeddings: str, tok,
                  n_vocab: int) -> None:
    from gguf import RopeScalingType

    cfg = model.model_config
    writer.add_type("model")
    writer.add_name(str(cfg.get("_name_or_path") or model.base.directory.name))
    writer.add_file_type(spec.FILE_TYPES[weights_dtype])
    writer.add_quantization_version(spec.QUANTIZATION_VERSION)
    if hp.arch.writes_vocab_size:
        writer.add_vocab_size(n_vocab)  # the embedding's rows (config vocab_size may differ)
    writer.add_context_length(hp.context_length)
    writer.add_embedding_length(hp.hidden)
    writer.add_block_count(hp.n_layer)
    writer.add_feed_forward_length(hp.intermediate)
    writer.add_head_count(hp.n_head)
    writer.add_head_count_kv(hp.n_head_kv)
    writer.add_layer_norm_rms_eps(hp.rms_eps)
    writer.add_rope_freq_base(hp.rope_theta)
    if hp.arch.writes_rope_dimension:
        writer.add_rope_dimension_count(hp.head_dim)
    if hp.write_key_length:
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


def export(model: MergedView, out: Path, *, embeddings: str = "f16", overwrite: bool = False,
           weights_dtype: str = "q4_1", progress: Optional[Callable[[str], None]] = None,
           split_max_bytes: Optional[int] = None) -> dict:
    """Write ``model`` (base with its adapter folded in) as a llama.cpp GGUF file at ``out``.

    Args:
        embeddings: storage of the token embedding (and of ``output.weight`` when untied):
            ``f16`` (default; lossless for fp16 checkpoints), ``f32``, or requantized (not exact, by
            request only): ``q8_0``, ``q6_k`` (what llama.cpp's Q4_1 file type uses for the output head;
            rows a multiple of 256, ``kquant.py``).
        overwrite: replace an existing ``out``; otherwise an existing file is refused.
        weights_dtype: ``q4_1`` (the folded codes, exact up to fp16 rounding of m) or ``f32``/``f16``
            (the unmerged effective weights ``W_hat + dW``, the noise-floor reference of docs/design.md §4).
        progress: called with each tensor name as it is written (for the CLI's progress bar).
        split_max_bytes: split the model into files of at most this many tensor bytes (a bigger
            tensor gets a file of its own), as llama.cpp's ``gguf-split`` does: ``out``'s directory
            gets ``<stem>-00001-of-0000N.gguf`` .. (``container.split_paths``), the first
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
    if embeddings == "q6_k":
        from qalora_export.formats.gguf.kquant import q6_k_constraint
        problem = q6_k_constraint(f"--embeddings q6_k ({spec.TOKEN_EMBD_TENSOR})", embd.shape[1])
        if problem:
            raise FormatLimitError(problem)
    tok = read_tokenizer(model.tokenizer_dir, n_vocab=embd.shape[0])

    # gguf-py's writer plans the split files from the tensor infos (a new file when the next
    # tensor would pass split_max_bytes) before any file is opened; so the file names are known
    # here, and the files are written under temporary names and renamed together.
    writer = GGUFWriter(None, hp.arch.gguf_arch, split_max_size=split_max_bytes or 0)
    _add_metadata(writer, model, hp, weights_dtype, embeddings, tok, embd.shape[0])
    for t in tensors:
        if t.ggml_type in ("Q4_1", "Q8_0", "Q6_K"):
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
    # a deferred base-fingerprint check (MergedView.open(defer_fingerprint=True), as the CLI opens
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
        "format": "gguf",
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
