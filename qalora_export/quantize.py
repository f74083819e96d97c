"""``quantize``: a float model to an AutoGPTQ checkpoint, layer by layer: min-max RTN
(``method="rtn"``) or Hessian-based GPTQ with calibration text (``method="gptq"``,
:mod:`qalora_export.gptq_quant`; optional act-order).

Every ``*_proj`` linear inside the decoder layers is quantized; embeddings, norms and the lm head
stay float (stored as fp16, as GPTQ checkpoints do).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from .errors import ConfigError
from .float_model import open_float_model
from .gptq_format import CHECKPOINT_FORMATS, CheckpointWriter, GPTQConfig, encode_layer, write_configs, zero_range
from .io_utils import atomic_output_dir
from .model import check_supported
from .quant import check_quant_args, quantize_rtn

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
                   damp: float = 0.01) -> QuantizeSummary:
    """Quantize ``model_path`` (HF directory or GGUF) into the GPTQ checkpoint ``out_dir``.

    Args:
        bits: 2, 3, 4 or 8. group_size: must divide every layer's input width.
        checkpoint_format: "gptq_v2" (stores true zeros) or "gptq" (v1: stores zero - 1, so
            zero-points are chosen in ``[1, 2**bits - 1]``).
        progress: called with each layer name (the CLI shows a bar).
        method: "rtn" (no data) or "gptq" (Hessian-based, calibration activations).
        act_order: GPTQ only: visit columns by decreasing Hessian diagonal (desc_act, g_idx).
        calibration: GPTQ calibration text; default the standard library's docstrings
            (:func:`qalora_export.gptq_quant.calibration_text`), offline.
        n_samples / seq_len: GPTQ calibration windows (consecutive token windows of the text).
        damp: GPTQ damping, a fraction of the Hessian's mean diagonal.
    """
    if method not in ("rtn", "gptq"):
        raise ConfigError(f"--method {method!r}: choose rtn or gptq")
    if method != "gptq" and (act_order or calibration is not None):
        raise ConfigError("--act-order and --calibration-file need --method gptq (RTN uses no data and no column order)")
    for flag, value in (("--calibration-samples", n_samples), ("--calibration-seq-len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{flag} must be a positive integer, got {value!r}")
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ConfigError(f"--checkpoint-format {checkpoint_format!r}: choose one of {CHECKPOINT_FORMATS}")
    if Path(out_dir).resolve() == Path(model_path).resolve():
        # --overwrite would replace the model being read: inputs are never modified.
        raise ConfigError(f"output {out_dir} is the input model itself; choose another output path")
    source = open_float_model(model_path)
    check_supported(source.model_config, model_path)
    names = source.tensor_names()
    linear = [n for n in names if QUANTIZED_LINEAR.match(n)]
    if not linear:
        raise ConfigError(f"{model_path}: no decoder projection weights (model.layers.N.*_proj.weight) found")
    config = GPTQConfig(bits=bits, group_size=group_size, desc_act=act_order, sym=False,
                        checkpoint_format=checkpoint_format)
    min_zero = zero_range(bits, checkpoint_format)[0]  # v1 cannot store a zero of 0
    errors = []
    with atomic_output_dir(Path(out_dir), overwrite=overwrite) as tmp:
        gptq_layers = _gptq_layers(source, tmp, linear, bits, group_size, act_order, calibration, n_samples,
                                   seq_len, damp, min_zero, progress) if method == "gptq" else {}
        writer = CheckpointWriter(tmp, max_shard_bytes)
        for name in names:
            tensor = source.read_tensor(name)
            if name in linear:
                module = name[: -len(".weight")]
                bias_name = module + ".bias"
                bias = source.read_tensor(bias_name) if bias_name in names else None
                if method == "gptq":
                    layer = gptq_layers.pop(module)
                else:
                    if progress:
                        progress(module)
                    layer = quantize_rtn(module, tensor, bits, group_size, bias=bias, min_zero=min_zero)
                w = tensor.to(torch.float64)
                errors.append(float((w - layer.dequantize()).norm() / w.norm().clamp_min(1e-30)))
                for suffix, packed in encode_layer(layer, checkpoint_format).items():
                    writer.add_tensor(f"{module}.{suffix}", packed)
            elif name.endswith(".bias") and name[: -len(".bias")] + ".weight" in linear:
                continue  # written with its layer
            else:
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
                 progress) -> dict:
    """Run GPTQ over the float model (loaded once, float32) on calibration windows of the text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .gptq_quant import calibration_batch, calibration_text, gptq_quantize_decoder
    from .model import hf_config_from

    for name in linear:
        check_quant_args(name, int(source.read_tensor(name).shape[1]), bits, group_size)
    source.save_tokenizer(tmp)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp))
    ids = calibration_batch(tokenizer, calibration if calibration is not None else calibration_text(),
                            n_samples, seq_len)
    config = hf_config_from(source.model_config)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {n: source.read_tensor(n).to(torch.float32) for n in source.tensor_names()}
    model.load_state_dict(state, strict=False)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.eval()
    return gptq_quantize_decoder(model, ids, bits, group_size, act_order, damp, min_zero, progress)
