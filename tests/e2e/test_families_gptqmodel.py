"""GPTQModel-quantized bases of the model families people fine-tune, end to end.

Each family's tiny float model (``tests/family_models.py``: Llama 3, Mistral, Qwen2 with q/k/v
biases and tied embeddings, Qwen3 with q/k norms; each with its real tokenizer) is quantized by
GPTQModel itself (real GPTQ: 4-bit, group 32, asymmetric, no act-order; calibration texts of random
English words taken from the standard library's docstrings, tokenized by the family's tokenizer),
in its own process, two families at a time. Then, per family:

1. our reader opens GPTQModel's checkpoint: the 14 projections are its quantized modules, decoded
   to a GPTQ approximation of the float weights; every tensor GPTQModel keeps unquantized (norms,
   q/k norms, embeddings, untied head, q/k/v biases) is the float model's, rounded to bfloat16 (the
   dtype GPTQModel loads the model in; biases are then stored as float16, which holds a bfloat16
   value exactly);
2. a random QA-LoRA adapter on that base (``tiny_models.make_random_adapter``);
3. ONNX and GGUF exports of base + adapter, each passing ``verify_artifact``: the weight level for
   all, the runtime level in onnxruntime for all and in llama.cpp for Mistral and Qwen3 (in verify's
   crash-isolated child process).

Timing (2 CPU cores): a GPTQModel quantization of one family takes ~15 s in its own process; the
GGUF runtime level (three llama.cpp runs over the full vocabularies) dominates the rest.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import family_models
import pytest
import tiny_models
import torch
from safetensors import safe_open

from qalora_export.checkpoint.gptq import GPTQCheckpoint
from qalora_export.checkpoint.merged_view import MergedView
from qalora_export.errors import UnsupportedModelError
from qalora_export.formats import get_format
from qalora_export.formats.gguf import spec as gguf_spec
from qalora_export.formats.onnx import spec as onnx_spec
from qalora_export.verify import verify_artifact

pytest.importorskip("gptqmodel")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxruntime_genai")

FAMILIES = family_models.FAMILY_NAMES
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

QUANTIZE_SCRIPT = r"""
import collections, json, os, pathlib, random, re, subprocess, sys
from gptqmodel import GPTQModel, QuantizeConfig
src, out = sys.argv[1], sys.argv[2]
# Calibration: 16 texts of ~64 tokens, random English words from the standard library's docstrings.
docs = " ".join(m.__doc__ or "" for m in (collections, json, os, pathlib, random, re, subprocess))
words = sorted({w for w in re.findall(r"\b[a-z]{3,12}\b", docs)})
rng = random.Random(0)
texts = [" ".join(rng.choice(words) for _ in range(58)).capitalize() + "." for _ in range(16)]
model = GPTQModel.load(src, QuantizeConfig(bits=4, group_size=32, desc_act=False, sym=False))
model.quantize(texts, batch_size=4)
model.save(out)
"""

#: Families whose SentencePiece ``tokenizer.model`` GPTQModel's save dropped (it saves the fast
#: tokenizer's ``tokenizer.json`` only); filled by ``gptqmodel_bases``, which then copies the file in
#: from the float model, as the GGUF export's error message tells a user to do.
DROPPED_SPM: dict[str, Path] = {}


@pytest.fixture(scope="module")
def gptqmodel_bases(family_model, tmp_path_factory) -> dict[str, Path]:
    """GPTQModel checkpoints of every family's float model, one subprocess per family, two at a time."""
    root = tmp_path_factory.mktemp("families-gptqmodel")
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": os.environ.get("GPTQMODEL_CPU_WORKERS", "2"),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out: dict[str, Path] = {}
    for start in range(0, len(FAMILIES), 2):
        running = []
        for family in FAMILIES[start:start + 2]:
            src = family_model(family).float_dir
            dst, log = root / family, root / f"{family}.log"
            with open(log, "w") as fh:
                proc = subprocess.Popen([sys.executable, "-c", QUANTIZE_SCRIPT, str(src), str(dst)], env=env,
                                        stdout=fh, stderr=subprocess.STDOUT)
            running.append((proc, family, dst, log))
        for proc, family, dst, log in running:
            if proc.wait(timeout=600) != 0:
                raise AssertionError(f"GPTQModel quantization of {family} failed:\n{log.read_text()[-4000:]}")
            spm = family_model(family).float_dir / "tokenizer.model"
            if spm.is_file() and not (dst / "tokenizer.model").is_file():
                keep = root / f"{family}-as-saved"  # GPTQModel's checkpoint as it saved it
                shutil.copytree(dst, keep)
                DROPPED_SPM[family] = keep
                shutil.copy2(spm, dst / "tokenizer.model")
            out[family] = dst
    return out


@pytest.fixture(scope="module")
def gptqmodel_adapters(gptqmodel_bases, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families-gptqmodel-adapters")
    return {family: tiny_models.make_random_adapter(base, root / family, rank=4, alpha=8.0, seed=0, magnitude=0.15)
            for family, base in gptqmodel_bases.items()}


def _float_tensors(float_dir: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(float_dir / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)


@pytest.mark.parametrize("family", FAMILIES)
def test_reader_opens_gptqmodel_checkpoint(family, family_model, gptqmodel_bases):
    ckpt = GPTQCheckpoint(gptqmodel_bases[family])
    cfg = ckpt.config
    assert (cfg.bits, cfg.group_size, cfg.sym, cfg.desc_act) == (4, 32, False, False)
    expected = sorted(f"model.layers.{i}.{p}" for i in range(family_models.LAYERS) for p in PROJECTIONS)
    assert sorted(ckpt.quantized_modules) == expected

    floats = _float_tensors(family_model(family).float_dir)
    # The projections: a 4-bit GPTQ approximation of the float weights (not some other matrix).
    for name in expected:
        layer = ckpt.read_layer(name)
        assert not layer.is_act_order
        w, ref = layer.dequantize(torch.float64), floats[f"{name}.weight"].to(torch.float64)
        assert w.shape == ref.shape
        rel = float((w - ref).norm() / ref.norm())
        assert rel < 0.15, f"{name}: GPTQModel's weight is {rel:.3f} (relative) from the float weight"

    # Everything else passes through: the float model's tensors rounded to bfloat16.
    others = ckpt.other_tensor_names()
    passthrough = sorted(k for k in floats if not any(k == f"{m}.weight" for m in expected))
    biases = [k for k in passthrough if k.endswith(".bias")]
    assert sorted(set(others) | set(biases)) == passthrough, (others, passthrough)
    for key in passthrough:
        got = ckpt.read_tensor(key)
        want = floats[key].to(torch.bfloat16)
        assert torch.equal(got.to(torch.float32), want.to(torch.float32)), f"{key} is not the float tensor"
    if family == "qwen2":
        assert len(biases) == 3 * family_models.LAYERS  # q/k/v biases
        assert "lm_head.weight" not in passthrough  # tied embeddings
    if family == "qwen3":
        assert sum(k.endswith(("q_norm.weight", "k_norm.weight")) for k in passthrough) == 2 * family_models.LAYERS
    if family in ("llama3", "mistral"):
        assert "lm_head.weight" in passthrough  # untied head


def _summary(report: dict, fmt: str) -> str:
    rt = report["runtime"]
    if fmt == "onnx":
        lg = rt["logits"]
        return (f"onnx: mean_kl={lg['mean_kl']:.3g} top1={lg['top1_agreement']:.3f} "
                f"dlogit_rel={lg['max_abs_logit_diff_rel']:.3g}")
    art, floor = rt["artifact"], rt["floor"]
    return (f"gguf: mean_kl={art['mean_kl']:.3g} (floor {floor['mean_kl']:.3g}, allowed {rt['allowed_mean_kl']:.3g}) "
            f"top1={art['top1_agreement']:.3f}")


GGUF_RUNTIME_FAMILIES = ("mistral", "qwen3")


@pytest.mark.parametrize("fmt", ["onnx", "gguf"])
@pytest.mark.parametrize("family", FAMILIES)
def test_export_of_gptqmodel_base_verifies(family, fmt, gptqmodel_bases, gptqmodel_adapters, tmp_path):
    if fmt == "gguf":
        pytest.importorskip("llama_cpp")
    base, adapter = gptqmodel_bases[family], gptqmodel_adapters[family]
    out = tmp_path / (family if fmt == "onnx" else f"{family}.gguf")
    get_format(fmt).export(MergedView.open(base, adapter), out)
    # llama.cpp's runtime level over a full 128k-152k vocabulary takes ~1 min a family on 2 cores; it
    # runs here for one SentencePiece and one byte-level BPE family (the other two pass it from RTN
    # bases in test_families_gguf.py, whose graphs and tokenizers are the same)
    runtime = fmt == "onnx" or family in GGUF_RUNTIME_FAMILIES
    report = verify_artifact(out, base, adapter, fmt=fmt, runtime=runtime)
    weights = report["weights"]
    assert report["passed"], report
    assert weights["passed"] and not weights["missing_layers"] and weights["layers_checked"] == 14
    if fmt == "onnx":  # float zero-points: the fold is exact (up to float32)
        assert weights["merge"]["exact"] is True and weights["merge"]["zeros_moved"] == 0
        assert weights["max_rel_vs_unmerged"] <= onnx_spec.WEIGHT_TOLERANCE
    else:  # Q4_1 stores scale and min in float16
        assert weights["max_rel_vs_unmerged"] <= gguf_spec.WEIGHT_TOLERANCE
    assert ("runtime" in report) is runtime
    summary = _summary(report, fmt) if runtime else "weight level only"
    print(f"\n[{family}] weights max_rel_vs_unmerged={weights['max_rel_vs_unmerged']:.3g}; {summary}")


def test_gguf_export_names_the_tokenizer_model_gptqmodel_dropped(gptqmodel_bases, tmp_path):
    """GPTQModel saves Mistral's SentencePiece tokenizer as tokenizer.json only (byte-fallback BPE);
    GGUF needs the SentencePiece scores: the export of the checkpoint as GPTQModel saved it refuses
    with a message naming the missing file (the other tests use the base with the file copied in)."""
    if "mistral" not in DROPPED_SPM:
        pytest.skip("GPTQModel kept Mistral's tokenizer.model (nothing to check)")
    with pytest.raises(UnsupportedModelError, match=r"has no tokenizer\.model; copy the model's tokenizer\.model"):
        get_format("gguf").export(MergedView.open(DROPPED_SPM["mistral"], None), tmp_path / "out.gguf")
