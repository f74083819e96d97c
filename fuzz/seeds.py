"""Build the fuzzing seed corpora and templates (nothing binary is committed; run this instead).

    .venv/bin/python fuzz/seeds.py [--out fuzz/corpus]

Writes one directory per fuzz target under ``--out`` (``safetensors/``, ``gptq_config/``,
``adapter/``, ``gguf/``, ``onnx/``, ``jsonl/``) holding seed inputs in the byte encoding that
``fuzz/harness.py`` expects, plus ``_templates/`` with the micro artifacts the targets rebuild
around each input (a 1-layer, hidden-32 GPTQ base with a BPE tokenizer, a random adapter, its
GGUF, ONNX and GPTQ exports, and an act-order v1 base). The micro model keeps every execution in the millisecond range.
Takes about 15 s; deterministic for a given package set.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT / "tests"), str(HERE)]

MICRO = dict(bits=4, group_size=32, hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64,
             tie_embeddings=True)

JSONL_SEEDS = [
    b'{"instruction": "Add 2 and 3.", "output": "5"}\n',
    b'{"instruction": "Name a color.", "input": "sky", "output": "blue"}\n'
    b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n',
    b'\xef\xbb\xbf{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "x"},'
    b' {"role": "assistant", "content": "y"}]}\n\n',
    b'{"instruction": "q", "input": null, "output": "\\u00e9\\n"}\r\n{"instruction": "r", "output": "s"}\n',
]


def build_templates(out: Path) -> Path:
    """The micro base, adapter, GGUF and ONNX artifacts under ``out/_templates``."""
    import gguf_helpers
    import tiny_models

    from qalora_export.formats import get_format
    from qalora_export.checkpoint.merged_view import MergedView

    tpl = out / "_templates"
    if tpl.exists():
        shutil.rmtree(tpl)
    tpl.mkdir(parents=True)
    base = gguf_helpers.make_bpe_base(tpl / "base", **MICRO)
    shutil.rmtree(tpl / "base-float")
    tiny_models.make_random_adapter(base, tpl / "adapter", rank=2, magnitude=0.05)
    model = MergedView.open(base, tpl / "adapter")
    get_format("gguf").export(model, tpl / "model.gguf")
    get_format("onnx").export(model, tpl / "onnx", zero_points="split")
    get_format("gptq").export(model, tpl / "merged")
    tiny_models.make_tiny_base(tpl / "act-order", act_order=True, checkpoint_format="gptq", **MICRO)
    shutil.rmtree(tpl / "act-order-float")
    return tpl


def write_corpora(out: Path, tpl: Path) -> dict[str, int]:
    """Seed inputs for every target, encoded as ``harness.py`` reads them."""
    from harness import ADAPTER_FILES, CONFIG_FILES, ONNX_FILES, encode_choice

    seeds: dict[str, list[bytes]] = {
        "safetensors": [(tpl / "base" / "model.safetensors").read_bytes(),
                        (tpl / "act-order" / "model.safetensors").read_bytes()],
        "gptq_config": [encode_choice(i, (tpl / "base" / name).read_bytes()) for i, name in enumerate(CONFIG_FILES)],
        "adapter": [encode_choice(i, (tpl / "adapter" / name).read_bytes()) for i, name in enumerate(ADAPTER_FILES)],
        "gguf": [(tpl / "model.gguf").read_bytes()],
        "onnx": [encode_choice(i, (tpl / "onnx" / name).read_bytes()) for i, name in enumerate(ONNX_FILES)],
        "jsonl": list(JSONL_SEEDS),
    }
    # A v1 config and a config without quantization_config (quantize_config.json is then read).
    cfg = json.loads((tpl / "base" / "config.json").read_text())
    v1 = json.loads(json.dumps(cfg))
    v1["quantization_config"]["checkpoint_format"] = "gptq"
    seeds["gptq_config"].append(encode_choice(0, json.dumps(v1).encode()))
    counts = {}
    for target, items in seeds.items():
        d = out / target
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        for i, data in enumerate(items):
            (d / f"seed-{i:02d}").write_bytes(data)
        counts[target] = len(items)
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "corpus")
    args = parser.parse_args(argv)
    tpl = build_templates(args.out)
    counts = write_corpora(args.out, tpl)
    print(json.dumps({"templates": str(tpl), "seeds": counts}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
