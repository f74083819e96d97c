"""The per-family results table: each model family exported to each format and verified in its runtime.

    python benchmarks/family_results.py [--work DIR] [--families llama3,mistral,qwen2,qwen3]
                                        [--formats gptq,onnx,gguf]

For each family of ``tests/family_models.py`` (tiny random-weight models carrying the family's real
architecture details, full vocabulary and chat template): a 4-bit group-32 RTN base, a random QA-LoRA
adapter, then ``qalora-export merge BASE ADAPTER --to FMT`` exactly as a user runs it (the export's
own verify: weight level + runtime level, the bundle's verify.json is read back). GPTQ gets an
adapter whose every folded zero moves by a whole code unit (what ``train --integer-zeros`` makes),
since GPTQ holds only integer zeros; ONNX and GGUF get a float-zero adapter.

Printed as one markdown table: the weights' largest error relative to the unmerged weights, the
runtime's mean KL and top-1 agreement against the unmerged PyTorch model, greedy continuations, the
adapter's own effect (mean KL base vs base + adapter in PyTorch: what the check must be able to
see), and for GGUF how llama.cpp tokenizes the chat-rendered verification prompts compared with
transformers. No timing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def adapter_effect(base: Path, adapter: Path) -> float:
    """Mean KL (unmerged vs base alone) in PyTorch over the verification prompts' positions."""
    import torch

    from qalora_export.checkpoint.adapter_files import load_adapter
    from qalora_export.modeling.model import build_model
    from qalora_export.verify import fixed_prompts

    prompts = fixed_prompts(base)
    plain = build_model(base)
    tuned = build_model(base, load_adapter(adapter))
    kls = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            p = torch.log_softmax(tuned(x).logits[0].double(), -1)
            q = torch.log_softmax(plain(x).logits[0].double(), -1)
            kls.append(float((p.exp() * (p - q)).sum(-1).mean()))
    return sum(kls) / len(kls)


LLAMA_TOKENIZE = """
import json, sys
from llama_cpp import Llama
path, prompts = sys.argv[1], json.loads(sys.stdin.read())
llm = Llama(model_path=path, vocab_only=True, verbose=False)
print(json.dumps([llm.tokenize(p.encode(), add_bos=False, special=True) for p in prompts]))
"""


def gguf_tokenizer_agreement(gguf_path: Path, tokenizer_dir: Path) -> str:
    """How many chat-rendered verification prompts llama.cpp tokenizes as transformers does."""
    from transformers import AutoTokenizer

    from qalora_export.verify import FIXED_PROMPTS

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    texts = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False)
             for t in FIXED_PROMPTS]
    expected = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    proc = subprocess.run([sys.executable, "-c", LLAMA_TOKENIZE, str(gguf_path)], input=json.dumps(texts),
                          capture_output=True, text=True, check=True)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    return f"{sum(a == b for a, b in zip(got, expected))}/{len(texts)}"


def runtime_figures(runtime: dict) -> tuple[str, str, str]:
    """(mean KL, top-1, greedy) of the artifact-vs-unmerged comparison in a format's runtime report."""
    comparisons = {k: v for k, v in runtime.items() if isinstance(v, dict) and "mean_kl" in v}
    # Each format names its artifact-vs-unmerged comparison; floors and references are not it.
    preferred = [k for k in ("artifact_vs_unmerged", "artifact", "logits") if k in comparisons]
    skip = ("floor", "reference", "base", "f32", "declared")
    others = [k for k in comparisons if not any(s in k for s in skip)]
    main = comparisons[(preferred or others)[0]] if preferred or others else None
    if main is None:
        return "n/a", "n/a", "n/a"
    greedy = main.get("greedy_match", runtime.get("greedy_match"))
    if greedy is None:
        checks = runtime.get("checks") or {}
        greedy = all(v for k, v in checks.items() if k.startswith("greedy")) if checks else "n/a"
    return f"{main['mean_kl']:.2e}", f"{main.get('top1_agreement', float('nan')):.3f}", str(greedy)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, help="working directory (default: a temporary one)")
    parser.add_argument("--families", default="llama3,mistral,qwen2,qwen3")
    parser.add_argument("--formats", default="gptq,onnx,gguf")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "tests"))
    import family_models
    import tiny_models

    work = args.work or Path(tempfile.mkdtemp(prefix="family-results-"))
    work.mkdir(parents=True, exist_ok=True)
    print("| family | format | verify | weights max rel err | runtime mean KL | top-1 | greedy | "
          "adapter effect (KL) | llama.cpp vs transformers tokens (chat prompts) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for family in args.families.split(","):
        model = family_models.build_family_model(family, work)
        integer = work / f"{family}-adapter-integer"
        if not integer.exists():  # every folded zero moves by a whole code unit: exact in GPTQ
            tiny_models.make_random_adapter(model.base_dir, integer, rank=8, alpha=16.0, integral_shift=True, seed=1)
        for fmt in args.formats.split(","):
            adapter = integer if fmt == "gptq" else model.adapter_dir
            out = work / f"{family}.{fmt}" if fmt != "gguf" else work / f"{family}.gguf"
            cmd = [sys.executable, "-m", "qalora_export.cli", "merge", str(model.base_dir), str(adapter),
                   "--to", fmt, "-o", str(out), "--overwrite"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            bundle = Path(str(out) + ".bundle") if fmt == "gguf" else out / "handoff"
            verify_json = bundle / "verify.json"
            if not verify_json.is_file():
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
                print(f"| {family} | {fmt} | export failed (exit {proc.returncode}): {tail[0][:120]} | | | | | | |")
                continue
            report = json.loads(verify_json.read_text())
            kl, top1, greedy = runtime_figures(report.get("runtime") or {})
            tokens = gguf_tokenizer_agreement(out, model.float_dir) if fmt == "gguf" else ""
            print(f"| {family} | {fmt} | {'PASSED' if report['passed'] else 'FAILED'} | "
                  f"{report['weights']['max_rel_vs_unmerged']:.1e} | {kl} | {top1} | {greedy} | "
                  f"{adapter_effect(model.base_dir, adapter):.2e} | {tokens} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
