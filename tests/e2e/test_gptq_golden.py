"""Golden tests against GPTQModel itself (the GPTQ runtime transformers uses).

1. GPTQModel quantizes a tiny random LLaMA (real GPTQ, calibration texts from the tiny vocabulary)
   and saves a v1 ("gptq") checkpoint; our reader's decode of every layer equals GPTQModel's own
   dequantization, and re-encoding our decode gives bit-identical qweight/qzeros/scales/g_idx.
2. Checkpoints written by us (``make_tiny_base``: every bit width, both checkpoint formats,
   act-order or not) load in transformers + GPTQModel, which dequantizes them to our weights and
   computes the logits of :func:`qalora_export.modeling.model.build_model`.

Tolerance: GPTQModel's ``gptq_torch`` kernel dequantizes in float16 (``scale * (q - zero)``
rounded once to fp16), while our decode is exact (fp16 scales widened, computed in float64). So
each weight may differ by fp16 rounding: ``|ours - theirs| <= 2**-11 * |ours|`` (half an fp16 ulp,
relative), plus ``2**-24`` absolute for fp16 subnormals. Exact 2-bit/3-bit products often round
to nothing at all. Logits inherit that relative error through the network (~1e-3 of |logit|).

Timing (2 CPU cores): a GPTQModel quantization of the tiny model takes ~8 s in its own process
(~30 s more the very first time, when GPTQModel compiles its CPU pack extension); loading a
checkpoint in transformers + GPTQModel takes ~5 s.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import tiny_models
from qalora_export.checkpoint.gptq import GPTQCheckpoint
from qalora_export.checkpoint.gptq_codec import encode_layer
from qalora_export.core.packing import pack_codes, unpack_codes

pytest.importorskip("gptqmodel")
pytest.importorskip("optimum")

TESTS_DIR = Path(__file__).resolve().parents[1]
REPO = TESTS_DIR.parent

FP16_REL = 2.0 ** -11  # half an fp16 ulp, relative
FP16_ABS = 2.0 ** -24  # smallest fp16 subnormal

# GPTQModel configurations quantized once per module: (bits, desc_act).
GOLDEN_CONFIGS = [(4, True), (3, True), (2, False), (8, False)]

QUANTIZE_SCRIPT = r"""
import random, sys
from gptqmodel import GPTQModel, QuantizeConfig
src, out, bits, act = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
rng = random.Random(bits)
# Calibration texts made of the tiny WordLevel tokenizer's vocabulary (w4 .. w127).
texts = [" ".join(f"w{rng.randrange(4, 128)}" for _ in range(64)) for _ in range(32)]
model = GPTQModel.load(src, QuantizeConfig(bits=bits, group_size=32, desc_act=act, sym=False))
model.quantize(texts, batch_size=4)
model.save(out)
"""


@pytest.fixture(scope="module")
def float_llama(tmp_path_factory) -> Path:
    return tiny_models.make_tiny_llama(tmp_path_factory.mktemp("golden") / "float")


@pytest.fixture(scope="module")
def gptqmodel_checkpoints(float_llama, tmp_path_factory) -> dict[tuple[int, bool], Path]:
    """GPTQModel-quantized checkpoints of the tiny LLaMA, one subprocess per configuration."""
    root = tmp_path_factory.mktemp("gptqmodel")
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": os.environ.get("GPTQMODEL_CPU_WORKERS", "2"),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = {}
    # Two at a time: each process spends much of its time starting up (imports) on one core.
    for start in range(0, len(GOLDEN_CONFIGS), 2):
        running = []
        for bits, act in GOLDEN_CONFIGS[start:start + 2]:
            dst = root / f"w{bits}-act{int(act)}"
            log = root / f"w{bits}-act{int(act)}.log"
            with open(log, "w") as fh:
                proc = subprocess.Popen([sys.executable, "-c", QUANTIZE_SCRIPT, str(float_llama), str(dst),
                                         str(bits), "1" if act else "0"], env=env, stdout=fh, stderr=subprocess.STDOUT)
            running.append((proc, bits, act, dst, log))
        for proc, bits, act, dst, log in running:
            if proc.wait(timeout=600) != 0:
                raise AssertionError(f"GPTQModel quantization {bits}-bit act={act} failed:\n{log.read_text()[-4000:]}")
            out[(bits, act)] = dst
    return out


def eager():
    """GPTQModel wraps its dequantization in torch.compile, which recompiles for every layer shape
    (~0.5 s each on CPU); the same code run eagerly computes the same fp16 values in milliseconds."""
    return torch._dynamo.config.patch(disable=True)


def load_in_gptqmodel(directory: Path, bits: int):
    """The checkpoint as transformers + GPTQModel load it, on the exact CPU path (gptq_torch, fp32)."""
    from transformers import AutoModelForCausalLM, GPTQConfig

    with eager():
        return AutoModelForCausalLM.from_pretrained(str(directory), quantization_config=GPTQConfig(
            bits=bits, backend="gptq_torch"), dtype=torch.float32)


def runtime_weight(model, name: str) -> torch.Tensor:
    """GPTQModel's dequantization of layer ``name`` as float64 ``[out, in]``.

    ``TorchLinear.dequantize_weight()`` returns fp16 ``[in, out]``; the same values come out of the
    module's forward on an identity matrix, which is checked too (it is the path inference takes).
    """
    module = model.get_submodule(name)
    with eager(), torch.no_grad():
        w = module.dequantize_weight()
        through_forward = module(torch.eye(module.in_features, dtype=torch.float32))
    assert w.dtype == torch.float16 and w.shape == (module.in_features, module.out_features)
    assert torch.equal(through_forward.to(torch.float16), w), f"{name}: forward differs from dequantize_weight"
    return w.T.to(torch.float64)


def assert_fp16_close(ours: torch.Tensor, theirs: torch.Tensor, name: str) -> None:
    err = (ours - theirs).abs()
    bound = ours.abs() * FP16_REL + FP16_ABS
    bad = err > bound
    assert not bool(bad.any()), (
        f"{name}: {int(bad.sum())} of {bad.numel()} weights differ beyond fp16 rounding; "
        f"max err {float(err.max()):.3g} (max |W| {float(ours.abs().max()):.3g})")


def assert_layers_match_runtime(directory: Path, bits: int) -> None:
    ckpt = GPTQCheckpoint(directory)
    model = load_in_gptqmodel(directory, bits)
    for name in ckpt.quantized_modules:
        ours = ckpt.read_layer(name).dequantize(torch.float64)
        assert_fp16_close(ours, runtime_weight(model, name), name)


# ----------------------------------------------------------------------------- GPTQModel -> us


@pytest.mark.parametrize("bits, act", GOLDEN_CONFIGS, ids=[f"w{b}-{'act' if a else 'noact'}" for b, a in GOLDEN_CONFIGS])
def test_reader_decodes_gptqmodel_checkpoint_like_gptqmodel(gptqmodel_checkpoints, bits, act):
    directory = gptqmodel_checkpoints[(bits, act)]
    ckpt = GPTQCheckpoint(directory)
    assert ckpt.config.bits == bits and ckpt.config.desc_act == act and ckpt.config.checkpoint_format == "gptq"
    layers = list(ckpt.iter_layers())
    assert len(layers) == 14
    if act:  # real act-order: GPTQModel permutes the columns of at least some layers
        assert any(layer.is_act_order for layer in layers)
    assert_layers_match_runtime(directory, bits)


@pytest.mark.parametrize("bits, act", GOLDEN_CONFIGS, ids=[f"w{b}-{'act' if a else 'noact'}" for b, a in GOLDEN_CONFIGS])
def test_reencoding_gptqmodel_checkpoint_is_bit_identical(gptqmodel_checkpoints, bits, act):
    ckpt = GPTQCheckpoint(gptqmodel_checkpoints[(bits, act)])
    for name in ckpt.quantized_modules:
        layer = ckpt.read_layer(name)
        raw = {s: ckpt.read_tensor(f"{name}.{s}") for s in ("qweight", "qzeros", "scales", "g_idx")}
        if float(layer.zeros.min()) < 1:
            # A true zero of 0 is stored as -1 in v1 and decodes with a carry (decode_zeros):
            # our writer refuses to produce such a checkpoint, so it cannot be re-encoded.
            with pytest.raises(Exception, match="use --checkpoint-format gptq_v2"):
                encode_layer(layer, "gptq")
            continue
        encoded = encode_layer(layer, "gptq")
        for suffix, tensor in raw.items():
            assert encoded[suffix].dtype == tensor.dtype, f"{name}.{suffix}"
            assert torch.equal(encoded[suffix], tensor), f"{name}.{suffix} differs after decode + encode"


@pytest.mark.parametrize("bits, act", [(2, False), (3, True)], ids=["w2", "w3-act"])
def test_v1_stored_minus_one_decodes_like_gptqmodel(gptqmodel_checkpoints, tmp_path, bits, act):
    """A v1 checkpoint storing -1 (a true zero of 0, all ones in the field) decodes wrong in every
    v1 runtime; decode_zeros must reproduce what GPTQModel computes, carry included."""
    src = gptqmodel_checkpoints[(bits, act)]
    dst = tmp_path / "edited"
    shutil.copytree(src, dst)
    name = "model.layers.0.self_attn.q_proj"
    key = f"{name}.qzeros"
    with safe_open(str(dst / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    out_features = tensors[f"{name}.qweight"].shape[1]
    stored = unpack_codes(tensors[key], bits, 1, out_features).to(torch.int64)
    maxq = (1 << bits) - 1
    stored[0, 0] = maxq  # carry into field 1 (2-bit) / wraps alone (3-bit)
    stored[0, 1] = maxq - 1
    stored[1, 32 // bits - 1 if bits != 3 else 9] = maxq  # last field of a word (2-bit: carry is lost)
    tensors[key] = pack_codes(stored, bits, 1)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    layer = GPTQCheckpoint(dst).read_layer(name)
    assert float(layer.zeros.min()) == 0.0
    model = load_in_gptqmodel(dst, bits)
    assert_fp16_close(layer.dequantize(torch.float64), runtime_weight(model, name), name)


# ----------------------------------------------------------------------------- us -> GPTQModel

# Each bit width in both formats, half of them act-order (8 loads of ~5 s).
WRITER_CONFIGS = [
    (2, "gptq", False), (2, "gptq_v2", True),
    (3, "gptq", True), (3, "gptq_v2", False),
    (4, "gptq", False), (4, "gptq_v2", True),
    (8, "gptq", True), (8, "gptq_v2", False),
]


@pytest.mark.parametrize("bits, fmt, act", WRITER_CONFIGS,
                         ids=[f"w{b}-{f}-{'act' if a else 'noact'}" for b, f, a in WRITER_CONFIGS])
def test_our_checkpoint_loads_in_gptqmodel_with_our_logits(tmp_path, bits, fmt, act):
    from qalora_export.modeling.model import build_model

    base = tiny_models.make_tiny_base(tmp_path / "base", bits=bits, group_size=32, act_order=act,
                                      checkpoint_format=fmt, seed=bits)
    ckpt = GPTQCheckpoint(base)
    assert ckpt.config.checkpoint_format == fmt and ckpt.config.desc_act == act
    model = load_in_gptqmodel(base, bits)
    for name in ckpt.quantized_modules:
        assert_fp16_close(ckpt.read_layer(name).dequantize(torch.float64), runtime_weight(model, name), name)

    ours = build_model(ckpt)
    ids = torch.randint(4, tiny_models.TINY_VOCAB, (2, 16), generator=torch.Generator().manual_seed(bits))
    with eager(), torch.no_grad():
        expected = ours(ids).logits
        got = model(ids).logits
    scale = float(expected.abs().max())
    err = float((expected - got).abs().max())
    # fp16 weight rounding (relative 2**-11 per weight) propagated through two layers.
    assert err <= 4e-3 * scale, f"max |dlogit| {err:.3g} for logits of magnitude {scale:.3g}"
    assert torch.equal(expected.argmax(-1), got.argmax(-1)) or err <= 1e-3 * scale
