"""Tests of qalora_export.quantization.quantize: float model -> GPTQ checkpoint by RTN, atomically, inputs untouched."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import tiny_models
from qalora_export.errors import CheckpointError, ConfigError, OutputExistsError, UnsupportedModelError
from qalora_export.checkpoint.gptq_config import INDEX_FILE, GPTQConfig
from qalora_export.checkpoint.gptq import GPTQCheckpoint
from qalora_export.core.record import quantize_rtn
from qalora_export.quantization.quantize import quantize_model


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory) -> Path:
    return tiny_models.make_tiny_llama(tmp_path_factory.mktemp("quantize") / "float")


def tree_hashes(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.endswith((".partial", ".old"))]


def float_tensors(directory: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("bits, fmt", [(4, "gptq_v2"), (3, "gptq"), (2, "gptq"), (8, "gptq_v2")])
def test_quantize_writes_rtn_records(float_dir, tmp_path, bits, fmt):
    before = tree_hashes(float_dir)
    seen = []
    out = tmp_path / "base"
    summary = quantize_model(float_dir, out, bits=bits, group_size=32, checkpoint_format=fmt, progress=seen.append)
    assert tree_hashes(float_dir) == before  # the input is never modified
    assert summary.quantized_layers == 14 and len(seen) == 14 and summary.bits == bits
    assert 0 < summary.mean_relative_error < {2: 0.6, 3: 0.3, 4: 0.15, 8: 0.01}[bits]
    ckpt = GPTQCheckpoint(out)
    assert ckpt.config == GPTQConfig(bits, 32, False, False, fmt)
    weights = float_tensors(float_dir)
    for name in ckpt.quantized_modules:
        rec = ckpt.read_layer(name)
        ref = quantize_rtn(name, weights[name + ".weight"], bits, 32, min_zero=1 if fmt == "gptq" else 0)
        assert torch.equal(rec.codes, ref.codes) and torch.equal(rec.scales, ref.scales)
        assert torch.equal(rec.zeros, ref.zeros) and not rec.is_act_order
    for name in ckpt.other_tensor_names():
        t = ckpt.read_tensor(name)
        assert t.dtype == torch.float16 and torch.equal(t, weights[name].half())
    for item in ("tokenizer.json", "tokenizer_config.json", "quantize_config.json", "config.json"):
        assert (out / item).is_file()
    assert json.loads((out / "config.json").read_text())["quantization_config"]["meta"]["quantizer_method"] == "rtn"
    assert leftovers(tmp_path) == []


def test_v1_zeros_are_at_least_one(float_dir, tmp_path):
    ckpt = GPTQCheckpoint(quantize_model(float_dir, tmp_path / "b", bits=2, group_size=16,
                                         checkpoint_format="gptq").out_dir)
    assert min(float(layer.zeros.min()) for layer in ckpt.iter_layers()) >= 1


def test_sharded_output_reads_like_single_file(float_dir, tmp_path):
    single = GPTQCheckpoint(quantize_model(float_dir, tmp_path / "one", bits=4, group_size=32).out_dir)
    sharded_dir = Path(quantize_model(float_dir, tmp_path / "many", bits=4, group_size=32, max_shard_bytes=16_000).out_dir)
    assert (sharded_dir / INDEX_FILE).is_file() and len(list(sharded_dir.glob("model-*-of-*.safetensors"))) > 2
    sharded = GPTQCheckpoint(sharded_dir)
    assert sharded.fingerprint() == single.fingerprint()
    assert sharded.other_tensor_names() == single.other_tensor_names()


def test_bias_is_quantized_with_its_layer(float_dir, tmp_path):
    src = tmp_path / "with-bias"
    shutil.copytree(float_dir, src)
    tensors = float_tensors(src)
    bias = torch.randn(64)
    tensors["model.layers.0.self_attn.q_proj.bias"] = bias
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    ckpt = GPTQCheckpoint(quantize_model(src, tmp_path / "b", bits=4, group_size=32).out_dir)
    rec = ckpt.read_layer("model.layers.0.self_attn.q_proj")
    assert torch.equal(rec.bias, bias.half().float())
    assert "model.layers.0.self_attn.q_proj.bias" not in ckpt.other_tensor_names()


# ----------------------------------------------------------------------------- refusals leave nothing


@pytest.mark.parametrize("kwargs, error, match", [
    ({"group_size": 48}, ConfigError, r"--group-size 48 does not divide the (64|128) input features of model.layers"),
    ({"group_size": 0}, ConfigError, r"--group-size 0"),
    ({"bits": 5}, ConfigError, r"--bits 5 is not supported"),
    ({"checkpoint_format": "gptq_v3"}, ConfigError, r"--checkpoint-format 'gptq_v3'"),
])
def test_bad_arguments(float_dir, tmp_path, kwargs, error, match):
    before = tree_hashes(float_dir)
    args = {"bits": 4, "group_size": 32, **kwargs}
    with pytest.raises(error, match=match):
        quantize_model(float_dir, tmp_path / "out", **args)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    assert tree_hashes(float_dir) == before


def test_unsupported_model_type(float_dir, tmp_path):
    src = tmp_path / "gpt2ish"
    shutil.copytree(float_dir, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=r"model_type 'gpt2' is not supported; supported: llama, mistral, qwen2"):
        quantize_model(src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_output_exists(float_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="already exists; choose another path or pass --overwrite"):
        quantize_model(float_dir, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and leftovers(tmp_path) == []
    quantize_model(float_dir, out, overwrite=True)
    assert not (out / "keep.txt").exists() and GPTQCheckpoint(out).config.bits == 4
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_damaged_float_input(float_dir, tmp_path, damage):
    src = tmp_path / "src"
    shutil.copytree(float_dir, src)
    path = src / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else data[:8] + b"{{{{" + data[12:])
    with pytest.raises(CheckpointError, match="model.safetensors is not a readable safetensors file"):
        quantize_model(src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_not_a_float_model(float_dir, tmp_path):
    with pytest.raises(CheckpointError, match="is neither a model directory nor a .gguf file"):
        quantize_model(tmp_path / "missing", tmp_path / "out")
    base = tmp_path / "base"
    quantize_model(float_dir, base)
    with pytest.raises(CheckpointError, match="is already quantized"):
        quantize_model(base, tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="has no config.json"):
        quantize_model(empty, tmp_path / "out")
    (empty / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match=r"has no .safetensors weights \(pickled .bin"):
        quantize_model(empty, tmp_path / "out")
    save_file({"model.norm.weight": torch.ones(4)}, str(empty / "model.safetensors"))
    with pytest.raises(ConfigError, match=r"no decoder projection weights"):
        quantize_model(empty, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_failure_midway_leaves_no_partial_output(float_dir, tmp_path, monkeypatch):
    import qalora_export.quantization.quantize as qmod

    calls = {"n": 0}
    real = qmod.encode_layer

    def failing(layer, fmt):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-write
        return real(layer, fmt)
    monkeypatch.setattr(qmod, "encode_layer", failing)
    with pytest.raises(KeyboardInterrupt):
        quantize_model(float_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_3bit_on_widths_the_runtimes_cannot_load_is_refused(tmp_path):
    from qalora_export.errors import FormatLimitError

    src = tiny_models.make_tiny_llama(tmp_path / "float48", hidden=48, intermediate=96)
    with pytest.raises(FormatLimitError, match="3-bit GPTQ packs 32 codes into 3 words.*Use --bits 2, 4 or 8"):
        quantize_model(src, tmp_path / "out", bits=3, group_size=16)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    quantize_model(src, tmp_path / "out4", bits=4, group_size=16)  # whole-word packing: fine


def test_output_cannot_be_the_input(float_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(float_dir, src)
    before = tree_hashes(src)
    with pytest.raises(ConfigError, match="is the input model itself"):
        quantize_model(src, src, overwrite=True)
    assert tree_hashes(src) == before and leftovers(tmp_path) == []
