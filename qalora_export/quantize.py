"""``quantize``: a float model to an AutoGPTQ checkpoint, layer by layer (min-max RTN).

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
from .gptq_format import CHECKPOINT_FORMATS, CheckpointWriter, GPTQConfig, encode_layer, write_configs
from .io_utils import atomic_output_dir
from .model import check_supported
from .quant import quantize_rtn

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
                   max_shard_bytes: int = 2 * 1024**3) -> QuantizeSummary:
    """Quantize ``model_path`` (HF directory or GGUF) into the GPTQ checkpoint ``out_dir``.

    Args:
        bits: 2, 3, 4 or 8. group_size: must divide every layer's input width.
        checkpoint_format: "gptq_v2" (stores true zeros) or "gptq" (v1: stores zero - 1, so
            zero-points are chosen in ``[1, 2**bits - 1]``).
        progress: called with each layer name (the CLI shows a bar).
    """
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
    config = GPTQConfig(bits=bits, group_size=group_size, desc_act=False, sym=False,
                        checkpoint_format=checkpoint_format)
    min_zero = 1 if checkpoint_format == "gptq" else 0
    errors = []
    with atomic_output_dir(Path(out_dir), overwrite=overwrite) as tmp:
        writer = CheckpointWriter(tmp, max_shard_bytes)
        for name in names:
            tensor = source.read_tensor(name)
            if name in linear:
                module = name[: -len(".weight")]
                if progress:
                    progress(module)
                bias_name = module + ".bias"
                bias = source.read_tensor(bias_name) if bias_name in names else None
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
        write_configs(tmp, source.model_config, config, {"quantizer_method": "rtn"})
        source.save_tokenizer(tmp)
    return QuantizeSummary(
        out_dir=str(out_dir), bits=bits, group_size=group_size, checkpoint_format=checkpoint_format,
        quantized_layers=len(linear), float_tensors=len(names) - len(linear),
        bytes_written=writer.total_bytes, mean_relative_error=sum(errors) / len(errors),
    )
