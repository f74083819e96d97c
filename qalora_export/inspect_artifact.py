"""``inspect``: a short description of an adapter or of an artifact of any registered format."""

from __future__ import annotations

from collections import Counter
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
    from qalora_export.core.adapter import AdapterError
    from qalora_export.checkpoint.adapter_files import load_adapter
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


def _inspect_gguf(path: Path) -> dict:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:
        raise ConfigError(f"{path} is not a readable GGUF file: {exc}") from exc
    types = Counter(t.tensor_type.name for t in reader.tensors)
    keys = {}
    for name in ("general.architecture", "general.name", "llama.block_count", "llama.embedding_length",
                 "llama.attention.head_count", "llama.attention.head_count_kv", "tokenizer.ggml.model"):
        field = reader.fields.get(name)
        if field is not None:
            keys[name] = field.contents()
    return {"kind": "gguf", "path": str(path), "bytes": path.stat().st_size, "tensors": len(reader.tensors),
            "tensor_types": dict(types), "metadata": keys}


def _inspect_onnx(path: Path) -> dict:
    import onnx

    model = onnx.load(str(path / "model.onnx"), load_external_data=False)
    ops = Counter(f"{n.domain + '.' if n.domain else ''}{n.op_type}" for n in model.graph.node)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    attrs = {}
    if nbits:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nbits[0].attribute}
    size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    return {"kind": "onnx", "path": str(path), "bytes": size, "nodes": len(model.graph.node),
            "matmulnbits": len(nbits), "matmulnbits_attributes": attrs,
            "inputs": [i.name for i in model.graph.input], "outputs": [o.name for o in model.graph.output],
            "op_counts": dict(ops.most_common(12))}
