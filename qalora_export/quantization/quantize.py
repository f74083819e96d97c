"""``quantize``: a float model to an AutoGPTQ checkpoint, layer by layer: min-max RTN
(``method="rtn"``) or Hessian-based GPTQ with calibration text (``method="gptq"``,
:mod:`qalora_export.quantization.gptq`; optional act-order), run one decoder layer at a time
(:mod:`qalora_export.quantization.gptq_layerwise`) on CPU or CUDA.

Each quantized layer is written to the checkpoint as soon as it is done, so neither method holds
the model: RTN holds one tensor, GPTQ one decoder layer plus the calibration activations.

Every ``*_proj`` linear inside the decoder layers is quantized; embeddings, norms and the lm head
stay float (stored as fp16, as GPTQ checkpoints do).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from qalora_export.checkpoint.float_source import open_float_model
from qalora_export.checkpoint.gptq_codec import encode_layer
from qalora_export.checkpoint.gptq_config import CHECKPOINT_FORMATS, CONFIG_FILE, GPTQConfig, zero_range
from qalora_export.checkpoint.gptq_writer import CheckpointWriter, write_configs
from qalora_export.core.record import check_quant_args, quantize_rtn
from qalora_export.errors import ConfigError, UnsupportedModelError
from qalora_export.modeling.model import check_supported
from qalora_export.storage.atomic import atomic_output_dir

QUANTIZED_LINEAR = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj\.weight$")


@dataclass
class QuantizeSummary:
    out_dir: str
    bits: int
    group_size: int
    checkpoint_format: str
    quantized_layers: int
    float_tensors: int
    bytes_written: int
    mean_relative_error: float  # ||W - W_hat|| / ||W|| averaged over layers


def quantize_model(model_path: Path | str, out_dir: Path | str, bits: int = 4, group_size: int = 32,
                   checkpoint_format: str = "gptq_v2", overwrite: bool = False,
                   progress: Optional[Callable[[str], None]] = None,
                   max_shard_bytes: int = 2 * 1024**3, method: str = "rtn", act_order: bool = False,
                   calibration: Optional[str] = None, n_samples: int = 128, seq_len: int = 512,
                   damp: float = 0.01, device: str = "cpu",
                   calibration_dtype: Optional[str] = None, group_aware_order: bool = False,
                   true_sequential: bool = False) -> QuantizeSummary:
    """Quantize ``model_path`` (HF directory or GGUF) into the GPTQ checkpoint ``out_dir``.

    Args:
        bits: 2, 3, 4 or 8. group_size: must divide every layer's input width.
        checkpoint_format: "gptq_v2" (stores true zeros) or "gptq" (v1: stores zero - 1, so
            zero-points are chosen in ``[1, 2**bits - 1]``).
        progress: called with each layer name (the CLI shows a bar).
        method: "rtn" (no data) or "gptq" (Hessian-based, calibration activations).
        act_order: GPTQ only: visit columns by decreasing Hessian diagonal (desc_act, g_idx).
        group_aware_order: GPTQ only: visit whole groups by their largest Hessian diagonal, columns
            inside by theirs (GPTQModel's act_group_aware); groups stay contiguous (no g_idx).
        true_sequential: GPTQ only: inside each decoder layer, calibrate each set of projections
            (q/k/v, o, gate/up, down) on the outputs of the already quantized ones.
        calibration: GPTQ calibration text; default the standard library's docstrings
            (:func:`qalora_export.quantization.gptq.calibration_text`), offline.
        n_samples / seq_len: GPTQ calibration windows (consecutive token windows of the text).
        damp: GPTQ damping, a fraction of the Hessian's mean diagonal.
        device: GPTQ only: "cpu" or "cuda[:n]", where the current decoder layer, the calibration
            activations and the Hessians live.
        calibration_dtype: GPTQ only: storage dtype of the calibration activations between layers,
            "float32" (default), "float16" or "bfloat16" (half the activation memory, measurably worse).
    """
    if method not in ("rtn", "gptq"):
        raise ConfigError(f"--method {method!r}: choose rtn or gptq")
    if method != "gptq" and (act_order or group_aware_order or true_sequential or calibration is not None):
        raise ConfigError("--act-order, --group-aware-order, --true-sequential and --calibration-file need --method "
                          "gptq (RTN uses no data and no column order)")
    if act_order and group_aware_order:
        raise ConfigError("--act-order and --group-aware-order are two column orders; choose one")
    if method != "gptq" and (device != "cpu" or calibration_dtype is not None):
        raise ConfigError(f"--device {device} / --calibration-dtype {calibration_dtype} need --method gptq "
                          f"(RTN streams tensor by tensor on the CPU)")
    for flag, value in (("--calibration-samples", n_samples), ("--calibration-seq-len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{flag} must be a positive integer, got {value!r}")
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ConfigError(f"--checkpoint-format {checkpoint_format!r}: choose one of {CHECKPOINT_FORMATS}")
    if Path(out_dir).resolve() == Path(model_path).resolve():
        # --overwrite would replace the model being read: inputs are never modified.
        raise ConfigError(f"output {out_dir} is the input model itself; choose another output path")
    if method == "gptq":  # fail on a bad flag before the source is opened
        from qalora_export.quantization.gptq_layerwise import resolve_activation_dtype, resolve_device

        resolve_activation_dtype(calibration_dtype, resolve_device(device))
    source = open_float_model(model_path)
    check_supported(source.model_config, model_path)
    names = source.tensor_names()
    linear = [n for n in names if QUANTIZED_LINEAR.match(n)]
    if not linear:
        raise ConfigError(f"{model_path}: no decoder projection weights (model.layers.N.*_proj.weight) found")
    for name in linear:  # before any work: a group size that does not divide a width
        check_quant_args(name, int(source.tensor_shape(name)[1]), bits, group_size)
    config = GPTQConfig(bits=bits, group_size=group_size, desc_act=act_order, sym=False,
                        checkpoint_format=checkpoint_format)
    min_zero = zero_range(bits, checkpoint_format)[0]  # v1 cannot store a zero of 0
    errors = []
    with atomic_output_dir(Path(out_dir), overwrite=overwrite) as tmp:
        writer = CheckpointWriter(tmp, max_shard_bytes)

        def write_layer(module: str, layer, weight: torch.Tensor) -> None:
            w = weight.to(torch.float64)
            errors.append(float((w - layer.dequantize()).norm() / w.norm().clamp_min(1e-30)))
            for suffix, packed in encode_layer(layer, checkpoint_format).items():
                writer.add_tensor(f"{module}.{suffix}", packed)

        if method == "gptq":
            _gptq_layers(source, tmp, linear, bits, group_size, act_order, calibration, n_samples, seq_len, damp,
                         min_zero, device, calibration_dtype, write_layer, progress, group_aware_order, true_sequential)
        for name in names:
            if name in linear:
                if method == "gptq":
                    continue  # written by its decoder layer's turn above
                module = name[: -len(".weight")]
                bias_name = module + ".bias"
                bias = source.read_tensor(bias_name) if bias_name in names else None
                if progress:
                    progress(module)
                tensor = source.read_tensor(name)
                write_layer(module, quantize_rtn(module, tensor, bits, group_size, bias=bias, min_zero=min_zero),
                            tensor)
            elif name.endswith(".bias") and name[: -len(".bias")] + ".weight" in linear:
                continue  # written with its layer
            else:
                tensor = source.read_tensor(name)
                writer.add_tensor(name, tensor.to(torch.float16) if tensor.is_floating_point() else tensor)
        writer.finish()
        write_configs(tmp, source.model_config, config, {"quantizer_method": method})
        source.save_tokenizer(tmp)
    return QuantizeSummary(
        out_dir=str(out_dir), bits=bits, group_size=group_size, checkpoint_format=checkpoint_format,
        quantized_layers=len(linear), float_tensors=len(names) - len(linear),
        bytes_written=writer.total_bytes, mean_relative_error=sum(errors) / len(errors),
    )


def _gptq_layers(source, tmp: Path, linear: list[str], bits: int, group_size: int, act_order: bool,
                 calibration: Optional[str], n_samples: int, seq_len: int, damp: float, min_zero: int,
                 device: str, calibration_dtype: Optional[str], write_layer, progress,
                 group_aware_order: bool, true_sequential: bool) -> None:
    """Tokenize the calibration windows, then GPTQ decoder layer by decoder layer, each projection
    handed to ``write_layer`` when done (:func:`qalora_export.quantization.gptq_layerwise.gptq_quantize_layerwise`)."""
    from transformers import AutoTokenizer

    from qalora_export.quantization.gptq import calibration_batch, calibration_text
    from qalora_export.quantization.gptq_layerwise import gptq_quantize_layerwise

    source.save_tokenizer(tmp)
    # The tokenizer as the checkpoint will be loaded, config.json beside it (write_configs rewrites
    # it at the end): transformers picks the tokenizer class by the model_type there, and without it
    # a Llama-2 / Mistral tokenizer.model loads as a LlamaTokenizer that splits runs of spaces unlike
    # SentencePiece (and unlike every later stage, which loads it from the checkpoint).
    (tmp / CONFIG_FILE).write_text(json.dumps(source.model_config))
    tokenizer = AutoTokenizer.from_pretrained(str(tmp))
    ids = calibration_batch(tokenizer, calibration if calibration is not None else calibration_text(),
                            n_samples, seq_len)
    wanted = {name[: -len(".weight")] for name in linear}
    done: set[str] = set()

    def sink(module: str, layer, weight: torch.Tensor) -> None:
        done.add(module)
        write_layer(module, layer, weight)

    gptq_quantize_layerwise(source, ids, bits, group_size, sink, act_order=act_order, damp=damp, min_zero=min_zero,
                            quantize=wanted, device=device, activation_dtype=calibration_dtype, progress=progress,
                            group_aware_order=group_aware_order, true_sequential=true_sequential)
    if done != wanted:
        missing = sorted(wanted - done)
        raise UnsupportedModelError(
            f"{source.path}: projection weights {missing[:3]} belong to no decoder layer of "
            f"{source.model_config.get('model_type')} (num_hidden_layers="
            f"{source.model_config.get('num_hidden_layers')}); the config and the weights disagree"
        )
