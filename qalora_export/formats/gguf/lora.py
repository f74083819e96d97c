"""A plain LoRA as a llama.cpp GGUF LoRA adapter (``llama-cli -m base.gguf --lora adapter.gguf``), laid out
as llama.cpp's ``convert_lora_to_gguf.py`` writes it and ``llama_adapter_lora_init`` reads it:

- metadata ``general.architecture`` (the base's), ``general.type = "adapter"``, ``adapter.type = "lora"``,
  ``adapter.lora.alpha`` (float32; llama.cpp scales by ``alpha / r``, ``r`` read from the tensors);
- per adapted linear, tensors ``<base tensor>.lora_a`` numpy ``[r, in]`` (ggml ``ne = [in, r]``) and
  ``<base tensor>.lora_b`` ``[out, r]`` (ggml ``ne = [r, out]``), F32 or F16 as stored in the PEFT
  folder, named after the base's tensors (``blk.N.attn_q.weight.lora_a``);
- for architectures whose q/k rows llama.cpp permutes (spec.ARCHITECTURES ``permute_qk``), the rows of
  ``lora_b`` of q and k permuted the same way (``B @ A`` then has the base tensor's row order).

The base GGUF is checked first (architecture, block count, every adapted tensor's shape): llama.cpp
would otherwise refuse the adapter only at load time, or, for a different model of the same shapes,
silently run it. The runtime check is in ``lora_verify``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from qalora_export.core.plain_lora import PlainLoRA, PlainLoRALayer
from qalora_export.errors import AdapterError, CheckpointError, UnsupportedModelError
from qalora_export.formats.gguf import spec as spec

#: The adapter file written into the output directory.
LORA_FILE = "adapter.gguf"
ADAPTER_TYPE = "lora"
LORA_A_SUFFIX, LORA_B_SUFFIX = ".lora_a", ".lora_b"
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


def _field(reader, key: str):
    return reader.fields.get(key)  # a container.GGUFFile (read._open_reader)


def base_facts(base_gguf: Path) -> dict:
    """What the LoRA must match in ``base_gguf``: architecture, type, block and head counts, and
    each tensor's shape as numpy ``[rows, cols]`` (``[out, in]`` for a linear)."""
    from qalora_export.formats.gguf.read import _open_reader

    reader = _open_reader(base_gguf)
    arch = _field(reader, "general.architecture")
    shapes = {t.name: tuple(int(d) for d in reversed(list(t.shape))) for t in reader.tensors}
    return {"arch": arch, "type": _field(reader, "general.type") or "model",
            "block_count": _field(reader, f"{arch}.block_count"),
            "n_head": _field(reader, f"{arch}.attention.head_count"),
            "n_head_kv": _field(reader, f"{arch}.attention.head_count_kv"), "shapes": shapes}


def check_base(lora: PlainLoRA, facts: dict, base_gguf: Path) -> dict[str, str]:
    """Module -> base tensor name, after checking that ``base_gguf`` is a model this LoRA fits.

    Raises:
        UnsupportedModelError: an architecture llama.cpp LoRA export is not implemented for here, or a
            module with no llama.cpp tensor name.
        AdapterError: the file is an adapter itself, has too few blocks, lacks an adapted tensor, or
            holds it with other shapes (a different model).
    """
    archs = sorted({a.gguf_arch for a in spec.ARCHITECTURES.values()})
    if facts["type"] == "adapter":
        raise AdapterError(f"{base_gguf} is itself a GGUF adapter; --gguf takes the base model's .gguf")
    if facts["arch"] not in archs:
        raise UnsupportedModelError(f"{base_gguf}: architecture {facts['arch']!r} is not one this tool writes "
                                    f"llama.cpp LoRAs for ({', '.join(archs)})")
    names = {}
    for module, layer in lora.layers.items():
        stem = spec.gguf_linear_name(module)
        if stem is None:
            raise UnsupportedModelError(f"adapted module {module} has no llama.cpp tensor name")
        block = int(_LAYER_RE.match(module).group(1))
        if facts["block_count"] is not None and block >= int(facts["block_count"]):
            raise AdapterError(f"the adapter adapts {module}, but {base_gguf} has {facts['block_count']} blocks; "
                               f"it is the GGUF of another model (pass the base the adapter was trained on)")
        tensor = f"{stem}.weight"
        want = (int(layer.lora_B.shape[0]), int(layer.lora_A.shape[1]))
        have = facts["shapes"].get(tensor)
        if have is None:
            raise AdapterError(f"{base_gguf} has no tensor {tensor} for adapted module {module}; it is the GGUF "
                               f"of another model")
        if have != want:
            raise AdapterError(f"{base_gguf}: tensor {tensor} is [out, in] = {list(have)} but the LoRA of {module} "
                               f"is {list(want)}; the GGUF is of another model (pass the adapter's base)")
        names[module] = tensor
    return names


def _row_permutation(module: str, rows: int, facts: dict) -> np.ndarray | None:
    arch = next(a for a in spec.ARCHITECTURES.values() if a.gguf_arch == facts["arch"])
    if not arch.permute_qk:
        return None
    heads = spec.qk_heads(module, int(facts["n_head"]), int(facts["n_head_kv"] or facts["n_head"]))
    return None if heads is None else spec.qk_row_permutation(rows, heads)


def export_lora(lora: PlainLoRA, out_dir: Path, base_artifact: Path) -> dict:
    """Write ``out_dir / LORA_FILE`` for ``base_artifact`` (a llama.cpp model GGUF); a summary."""
    from gguf import GGUFType, GGUFWriter, Keys

    facts = base_facts(Path(base_artifact))
    names = check_base(lora, facts, Path(base_artifact))
    path = Path(out_dir) / LORA_FILE
    writer = GGUFWriter(str(path), facts["arch"])
    writer.add_type(GGUFType.ADAPTER)
    writer.add_string(Keys.Adapter.TYPE, ADAPTER_TYPE)
    writer.add_float32(Keys.Adapter.LORA_ALPHA, float(lora.alpha))
    writer.add_string(spec.KEY_PREFIX + "lora_source", "plain LoRA of a QA-LoRA adapter (docs/lora.md)")
    permuted = []
    for module, layer in lora.layers.items():
        b = layer.lora_B.numpy()
        perm = _row_permutation(module, b.shape[0], facts)
        if perm is not None:
            b, _ = b[perm], permuted.append(module)
        writer.add_tensor(names[module] + LORA_A_SUFFIX, np.ascontiguousarray(layer.lora_A.numpy()))
        writer.add_tensor(names[module] + LORA_B_SUFFIX, np.ascontiguousarray(b))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return {"files": [LORA_FILE], "base_gguf": str(base_artifact), "arch": facts["arch"],
            "tensors": 2 * len(lora.layers), "qk_rows_permuted": len(permuted)}


def read_lora(path: Path, base_artifact: Path) -> tuple[float, dict[str, PlainLoRALayer]]:
    """``(alpha, module -> factors)`` of a GGUF LoRA, q/k rows of ``lora_b`` put back in transformers'
    order (the base GGUF gives the head counts): the inverse of :func:`export_lora`.

    Raises:
        CheckpointError: not a GGUF LoRA adapter, or an ``.lora_a`` without its ``.lora_b``.
    """
    from qalora_export.formats.gguf.read import _open_reader

    reader = _open_reader(path)
    if _field(reader, "general.type") != "adapter" or _field(reader, "adapter.type") != ADAPTER_TYPE:
        raise CheckpointError(f"{path} is not a GGUF LoRA adapter (general.type adapter, adapter.type lora)")
    facts = base_facts(Path(base_artifact))
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    layers = {}
    for name, a in tensors.items():
        if not name.endswith(LORA_A_SUFFIX):
            continue
        stem = name[: -len(LORA_A_SUFFIX)]
        if stem + LORA_B_SUFFIX not in tensors:
            raise CheckpointError(f"{path}: {name} has no {stem + LORA_B_SUFFIX}")
        module = spec.hf_linear_name(stem)
        b = tensors[stem + LORA_B_SUFFIX]
        perm = _row_permutation(module, b.shape[0], facts)
        if perm is not None:
            b = b[np.argsort(perm)]
        layers[module] = PlainLoRALayer(torch.from_numpy(a.copy()), torch.from_numpy(np.ascontiguousarray(b)))
    return float(_field(reader, "adapter.lora.alpha")), layers


def verify_lora(model, lora_dir: Path, base_artifact: Path, prompts: list[list[int]], workdir: Path) -> dict:
    """The runtime check (``lora_verify.verify_lora``)."""
    from qalora_export.formats.gguf.lora_verify import verify_lora as run

    return run(model, Path(lora_dir) / LORA_FILE, Path(base_artifact), prompts, Path(workdir))
