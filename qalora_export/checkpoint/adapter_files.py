"""QA-LoRA adapters on disk, in PEFT's directory layout (so ``peft.PeftModel.from_pretrained`` loads them):

- ``adapter_config.json``: PEFT's LoraConfig with ``use_qalora`` and ``qalora_group_size``;
- ``adapter_model.safetensors``: ``base_model.model.<module>.lora_A.weight`` ``[r, L]`` and
  ``...lora_B.weight`` ``[out, r]``, read one layer's factors at a time (:class:`AdapterFactors`);
- ``qalora_export.json`` (ours, versioned): pooling convention, pooling groups, and the
  fingerprint of the base the adapter was trained on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Literal, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qalora_export.core.adapter import AdapterLayer, QALoRAAdapter
from qalora_export.core.record import all_finite
from qalora_export.errors import AdapterError
from qalora_export.storage.atomic import atomic_output_dir, read_json

Pooling = Literal["mean", "sum", "peft"]
PoolGroups = Literal["consecutive", "quantization"]
POOLINGS: tuple[str, ...] = ("mean", "sum", "peft")


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_METADATA = "qalora_export.json"
METADATA_VERSION = 1
PEFT_PREFIX = "base_model.model."

# --------------------------------------------------------------------------------------- writing


def save_adapter(adapter: QALoRAAdapter, out_dir: Path, base_model_path: str = "",
                 overwrite: bool = False, *, contiguous_base: bool = False,
                 extra_files: Optional[dict[str, str | bytes]] = None) -> None:
    """Write ``adapter`` in PEFT's layout plus our metadata, atomically (temp dir, then rename).

    Args:
        contiguous_base: the base's quantization groups are runs of ``pool_group_size``
            consecutive columns (no act-order), so an adapter pooling over them ("quantization")
            pools exactly as PEFT does: ``use_qalora`` is then set and PEFT loads it.
        extra_files: more files (name -> text or bytes) written into the same directory inside
            the same atomic step (e.g. the trainer's ``training_log.jsonl``).
    """
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_path,
        "r": adapter.rank,
        "lora_alpha": adapter.alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted(adapter.target_modules or _target_names(adapter.layers)),
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "use_qalora": adapter.pooling == "peft" and (adapter.pool_groups == "consecutive" or contiguous_base),
        "qalora_group_size": adapter.pool_group_size,
        "modules_to_save": None,
    }
    metadata = {
        "format_version": METADATA_VERSION,
        "pooling": adapter.pooling,
        "pool_group_size": adapter.pool_group_size,
        "pool_groups": adapter.pool_groups,
        "base_fingerprint": adapter.base_fingerprint,
        "rank": adapter.rank,
        "alpha": adapter.alpha,
        **adapter.extra,
    }
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in adapter.layers.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach().to(torch.float32).contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach().to(torch.float32).contiguous()
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        (tmp / ADAPTER_METADATA).write_text(json.dumps(metadata, indent=2) + "\n")
        for name, content in (extra_files or {}).items():
            if Path(name).name != name or name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG, ADAPTER_METADATA):
                raise AdapterError(f"extra adapter file name {name!r} must be a plain new file name")
            target = tmp / name
            target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content)


def _target_names(layers: dict[str, AdapterLayer]) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name in layers})


# --------------------------------------------------------------------------------------- reading


def load_adapter(adapter_dir: Path, pooling: Optional[str] = None) -> QALoRAAdapter:
    """Read an adapter directory written by us, by PEFT (``use_qalora``), or by the official code.

    The pooling convention comes from our metadata, else from unambiguous evidence (PEFT's
    ``adapter_config.json`` with ``use_qalora: true`` means "peft"), else from ``pooling`` (the
    ``--pooling`` flag). A flag that contradicts recorded metadata is refused, not obeyed silently.

    Raises:
        AdapterError: missing files, unreadable tensors, NaN/inf, shape mismatches, an unknown or
            ambiguous convention.
    """
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / ADAPTER_CONFIG
    weights_path = adapter_dir / ADAPTER_WEIGHTS
    if not adapter_dir.is_dir():
        raise AdapterError(f"adapter directory {adapter_dir} does not exist")
    if not config_path.is_file() or not weights_path.is_file():
        raise AdapterError(
            f"{adapter_dir} is not an adapter directory: it needs {ADAPTER_CONFIG} and "
            f"{ADAPTER_WEIGHTS} (PEFT's layout; `qalora-export train` writes it)"
        )
    config = read_json(config_path, AdapterError)
    meta_path = adapter_dir / ADAPTER_METADATA
    metadata = read_json(meta_path, AdapterError) if meta_path.is_file() else None
    if pooling is not None and pooling not in POOLINGS:
        raise AdapterError(f"--pooling {pooling!r} is not a convention; choose one of {POOLINGS}")

    rank = _int_field(config, "r", config_path)
    alpha = _float_field(config, "lora_alpha", config_path)
    if config.get("use_rslora"):
        raise AdapterError(f"{config_path}: use_rslora adapters are not QA-LoRA adapters this tool folds")
    if config.get("use_dora"):
        raise AdapterError(f"{config_path}: DoRA adapters cannot be folded into zero-points")

    pool_groups: PoolGroups = "consecutive"
    fingerprint = None
    extra: dict = {}
    if metadata is not None:
        version = metadata.get("format_version")
        if not isinstance(version, int) or version > METADATA_VERSION:
            raise AdapterError(
                f"{meta_path}: format_version {version!r} is not one this qalora-export reads "
                f"(<= {METADATA_VERSION}); upgrade qalora-export"
            )
        recorded = metadata.get("pooling")
        if recorded not in POOLINGS:
            raise AdapterError(f"{meta_path}: pooling {recorded!r} is not one of {POOLINGS}")
        if pooling is not None and pooling != recorded:
            raise AdapterError(
                f"--pooling {pooling} contradicts the convention recorded in {meta_path} "
                f"({recorded}); drop the flag"
            )
        convention = recorded
        group_size = _int_field(metadata, "pool_group_size", meta_path)
        pool_groups = metadata.get("pool_groups", "consecutive")
        if pool_groups not in ("consecutive", "quantization"):
            raise AdapterError(f"{meta_path}: pool_groups {pool_groups!r} is not consecutive|quantization")
        fingerprint = metadata.get("base_fingerprint")
        if fingerprint is not None and (not isinstance(fingerprint, str) or not fingerprint.startswith("sha256:")):
            raise AdapterError(f"{meta_path}: base_fingerprint {fingerprint!r} is not a 'sha256:...' fingerprint")
        extra = {k: v for k, v in metadata.items() if k not in {
            "format_version", "pooling", "pool_group_size", "pool_groups", "base_fingerprint",
            "rank", "alpha"}}
    elif config.get("use_qalora"):
        if pooling is not None and pooling != "peft":
            raise AdapterError(
                f"--pooling {pooling} contradicts {config_path}: use_qalora=true means PEFT's "
                f"convention (peft); drop the flag"
            )
        convention = "peft"
        group_size = _int_field(config, "qalora_group_size", config_path)
    else:
        if pooling is None:
            raise AdapterError(
                f"{adapter_dir} does not record its pooling convention (no {ADAPTER_METADATA}, no "
                f"use_qalora in {ADAPTER_CONFIG}); the conventions differ by constant factors, so "
                f"pass --pooling mean (official QA-LoRA code), sum (the paper's Algorithm 1) or "
                f"peft"
            )
        convention = pooling
        group_size = config.get("qalora_group_size") or config.get("group_size")
        if not isinstance(group_size, int):
            group_size = None  # inferred per layer from A's shape below

    layers = _read_layers(weights_path, rank)
    # 0 = not recorded: each layer's p is then in / L, derived when the base's widths are known.
    group_size = group_size or 0
    return QALoRAAdapter(
        layers=layers, rank=rank, alpha=alpha, pooling=convention, pool_group_size=int(group_size),
        pool_groups=pool_groups, base_fingerprint=fingerprint,
        target_modules=_target_modules(config.get("target_modules"), layers), extra=extra,
    )


def _open_weights(weights_path: Path):
    try:
        return safe_open(str(weights_path), framework="pt")
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise AdapterError(f"{weights_path} is not a readable safetensors file: {exc}") from exc


def _checked_tensor(f, key: str, weights_path: Path) -> torch.Tensor:
    """Tensor ``key`` of an open adapter file, refused unless it is floating point and finite."""
    try:
        tensor = f.get_tensor(key)
    except Exception as exc:
        raise AdapterError(f"{weights_path}: tensor {key} cannot be read: {exc}") from exc
    if not tensor.is_floating_point():
        raise AdapterError(
            f"{weights_path}: tensor {key} is {tensor.dtype}; LoRA factors are floating point (the file is "
            f"corrupt or not an adapter)"
        )
    if not all_finite(tensor):
        raise AdapterError(
            f"{weights_path}: tensor {key} contains NaN or inf; the adapter is corrupt or "
            f"its training diverged, and folding it would corrupt the model"
        )
    return tensor


class AdapterFactors(MutableMapping[str, AdapterLayer]):
    """An adapter file's factors by module, read one module at a time.

    :func:`load_adapter` has checked the whole file (every tensor read once, checked and dropped),
    so a malformed adapter is refused before anything is written. Each lookup then reads that
    module's ``A`` and ``B`` again, with the same checks, and only the last module read is kept:
    memory is one layer's factors, not the adapter's (0.43 GB at rank 16 for a 70B model).
    Modules assigned (``factors[name] = AdapterLayer(...)``) are held in memory, as in a dict.
    """

    def __init__(self, weights_path: Path, keys: dict[str, tuple[str, str]]):
        self.weights_path = weights_path
        self._keys: dict[str, Optional[tuple[str, str]]] = dict(keys)  # module -> (A key, B key); None: assigned
        self._assigned: dict[str, AdapterLayer] = {}
        self._last: Optional[tuple[str, AdapterLayer]] = None

    def __getitem__(self, module: str) -> AdapterLayer:
        if module in self._assigned:
            return self._assigned[module]
        if self._last is not None and self._last[0] == module:
            return self._last[1]
        key_a, key_b = self._keys[module]
        with _open_weights(self.weights_path) as f:
            layer = AdapterLayer(_checked_tensor(f, key_a, self.weights_path),
                                 _checked_tensor(f, key_b, self.weights_path))
        self._last = (module, layer)
        return layer

    def __setitem__(self, module: str, layer: AdapterLayer) -> None:
        self._assigned[module] = layer
        self._keys.setdefault(module, None)

    def __delitem__(self, module: str) -> None:
        del self._keys[module]
        self._assigned.pop(module, None)
        if self._last is not None and self._last[0] == module:
            self._last = None

    def __contains__(self, module: object) -> bool:  # no read (the default would read the factors)
        return module in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _read_layers(weights_path: Path, rank: int) -> AdapterFactors:
    """Check every lora_A / lora_B tensor of the file (read one at a time, not kept) and return
    the factors as a lazy mapping."""
    found: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}
    with _open_weights(weights_path) as f:
        for key in f.keys():
            module, part = _split_key(key)
            if part is None:
                continue
            tensor = _checked_tensor(f, key, weights_path)
            found.setdefault(module, {})[part] = (key, tuple(tensor.shape))
            del tensor
    if not found:
        raise AdapterError(f"{weights_path} holds no lora_A/lora_B tensors")
    keys: dict[str, tuple[str, str]] = {}
    for module, parts in sorted(found.items()):
        if set(parts) != {"A", "B"}:
            raise AdapterError(f"{weights_path}: module {module} has lora_{''.join(parts)} but not both A and B")
        (key_a, a_shape), (key_b, b_shape) = parts["A"], parts["B"]
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != rank or b_shape[1] != rank:
            raise AdapterError(
                f"{weights_path}: module {module} has lora_A {a_shape} and lora_B "
                f"{b_shape}; rank r={rank} needs A [r, L] and B [out, r]"
            )
        keys[module] = (key_a, key_b)
    return AdapterFactors(weights_path, keys)


def _target_modules(value, layers: dict[str, AdapterLayer]) -> list[str]:
    """PEFT's ``target_modules``: a list of names, or one string (a name or a regex); else derived."""
    if isinstance(value, str) and value:
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    return _target_names(layers)


def _split_key(key: str) -> tuple[str, Optional[str]]:
    """``base_model.model.X.lora_A[.default].weight`` -> (``X``, "A")."""
    name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p in ("lora_A", "lora_B") and parts[-1] == "weight":
            return ".".join(parts[:i]), p[-1]
    return name, None


def _int_field(obj: dict, key: str, path: Path) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise AdapterError(f"{path}: field {key!r} must be a positive integer, got {value!r}")
    return value


def _float_field(obj: dict, key: str, path: Path) -> float:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AdapterError(f"{path}: field {key!r} must be a finite number, got {value!r}")
    return float(value)
