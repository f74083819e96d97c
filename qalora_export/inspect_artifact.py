"""``inspect``: a short description of an adapter or of an artifact of any registered format."""

from __future__ import annotations

from pathlib import Path

from qalora_export.errors import ConfigError
from qalora_export.formats import all_formats, detect_format


def inspect_path(path: Path) -> dict:
    """What ``path`` is and what it holds, as a JSON-able dict: an adapter directory, or an artifact
    of any registered format (each format's ``inspect``)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} does not exist")
    if path.is_dir() and (path / "adapter_config.json").is_file():
        return _inspect_adapter(path)
    try:
        fmt = detect_format(path)
    except ConfigError:
        kinds = ", ".join(f.artifact for f in all_formats())
        raise ConfigError(f"{path}: not an adapter directory or a known artifact ({kinds})") from None
    return fmt.inspect(path)


def _inspect_adapter(path: Path) -> dict:
    from qalora_export.checkpoint.adapter_files import load_adapter
    from qalora_export.core.adapter import AdapterError
    from qalora_export.storage.atomic import read_json

    config = read_json(path / "adapter_config.json", AdapterError)
    try:
        adapter = load_adapter(path)
        pooling = adapter.pooling
    except AdapterError as exc:
        if "does not record its pooling" not in str(exc):
            raise
        adapter = load_adapter(path, pooling="mean")
        pooling = "not recorded (pass --pooling)"
    return {
        "kind": "QA-LoRA adapter (PEFT layout)",
        "path": str(path),
        "rank": adapter.rank,
        "alpha": adapter.alpha,
        "scale": adapter.scale,
        "pooling": pooling,
        "pool_group_size": adapter.pool_group_size or "per layer (in / L)",
        "pool_groups": adapter.pool_groups,
        "layers": len(adapter.layers),
        "target_modules": adapter.target_modules,
        "base_fingerprint": adapter.base_fingerprint,
        "peft_use_qalora": config.get("use_qalora"),
        "extra": adapter.extra,
    }
