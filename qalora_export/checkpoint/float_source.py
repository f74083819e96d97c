"""Reading float models: a Hugging Face safetensors directory, or a GGUF file (the fixture).

A float source yields its config, its tensors one at a time, and can save its tokenizer files
next to a derived checkpoint. Safetensors directories are streamed (mmap, tensor by tensor);
a GGUF file is dequantized to float by transformers (``gguf`` package), which holds the whole
model in memory: fine for the small models GGUF inputs are used for here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from qalora_export.errors import CheckpointError
from qalora_export.storage.atomic import read_json

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
SKIPPED_FILES = {"config.json", "quantize_config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"}


class FloatSource:
    """A float model to quantize. Use :func:`open_float_model`."""

    path: Path
    model_config: dict

    def tensor_names(self) -> list[str]:
        raise NotImplementedError

    def read_tensor(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        """The shape of tensor ``name`` without reading its data."""
        raise NotImplementedError

    def save_tokenizer(self, out_dir: Path) -> None:
        raise NotImplementedError


class SafetensorsSource(FloatSource):
    """A Hugging Face model directory with float safetensors (single file or sharded)."""

    def __init__(self, path: Path):
        from qalora_export.checkpoint.gptq import _index_tensors

        self.path = path
        config_path = path / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{path} has no config.json; pass a Hugging Face model directory or a .gguf file")
        self.model_config = read_json(config_path, CheckpointError)
        if "quantization_config" in self.model_config:
            raise CheckpointError(
                f"{path} is already quantized ({self.model_config['quantization_config'].get('quant_method', '?')}); "
                f"quantize a float model, or use it directly as BASE_DIR if it is a GPTQ checkpoint"
            )
        if not any(path.glob("*.safetensors")):
            raise CheckpointError(f"{path} has no .safetensors weights (pickled .bin checkpoints are not read; convert them)")
        self._files = _index_tensors(path)

    def tensor_names(self) -> list[str]:
        return sorted(self._files)

    def read_tensor(self, name: str) -> torch.Tensor:
        # A handle per read: a handle kept open keeps its mmap, and every page read through it
        # stays in RSS until the end, growing to the model's size over a layer-by-layer pass.
        return self._read(name, lambda f: f.get_tensor(name))

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._read(name, lambda f: f.get_slice(name).get_shape()))

    def _read(self, name: str, get):
        from safetensors import safe_open

        path = self._files[name]
        try:
            with safe_open(str(path), framework="pt") as f:
                return get(f)
        except Exception as exc:
            raise CheckpointError(f"{path}: tensor {name} cannot be read ({exc}); the file is truncated or corrupt") from exc

    def save_tokenizer(self, out_dir: Path) -> None:
        for item in self.path.iterdir():
            if item.is_file() and item.name not in SKIPPED_FILES and not item.name.endswith(WEIGHT_SUFFIXES):
                shutil.copy2(item, out_dir / item.name)


class GGUFSource(FloatSource):
    """A GGUF file, dequantized to float32 by transformers."""

    def __init__(self, path: Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.path = path
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        except (ValueError, OSError, KeyError) as exc:
            raise CheckpointError(f"{path} cannot be loaded as a GGUF model by transformers: {exc}") from exc
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["torch_dtype"] = "float16"
        config.pop("dtype", None)
        self.model_config = config
        self._state = {k: v.detach() for k, v in model.state_dict().items()}
        if getattr(model.config, "tie_word_embeddings", False):
            self._state.pop("lm_head.weight", None)
        self._generation_config = model.generation_config

    def tensor_names(self) -> list[str]:
        return sorted(self._state)

    def read_tensor(self, name: str) -> torch.Tensor:
        return self._state[name]

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._state[name].shape)

    def save_tokenizer(self, out_dir: Path) -> None:
        self._tokenizer.save_pretrained(str(out_dir))
        self._generation_config.save_pretrained(str(out_dir))


def open_float_model(path: Path | str) -> FloatSource:
    """A float model from a directory (safetensors) or a ``.gguf`` file."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return GGUFSource(path)
    if path.is_dir():
        return SafetensorsSource(path)
    raise CheckpointError(f"MODEL {path} is neither a model directory nor a .gguf file")
