"""GPTQ one decoder layer at a time (qalora_export.quantization.gptq_layerwise): one layer in memory, chunking
and storage dtype of the calibration activations, device flags.

No timing is asserted.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tiny_models
from qalora_export.quantization import gptq_layerwise
from qalora_export.errors import ConfigError
from qalora_export.checkpoint.float_source import open_float_model
from qalora_export.quantization.gptq import calibration_batch
from qalora_export.quantization.quantize import quantize_model


def random_text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(f"w{rng.randint(4, 127)}" for _ in range(n_words))


def run_layerwise(float_dir: Path, **kwargs) -> dict:
    from transformers import AutoTokenizer

    source = open_float_model(float_dir)
    ids = calibration_batch(AutoTokenizer.from_pretrained(str(float_dir)), random_text(8 * 24, 3), 8, 24)
    records: dict = {}
    gptq_layerwise.gptq_quantize_layerwise(source, ids, 4, 16, lambda n, rec, w: records.setdefault(n, rec),
                                           **kwargs)
    return records


def test_only_one_decoder_layer_is_materialised_at_a_time(tmp_path, monkeypatch):
    float_dir = tiny_models.make_tiny_llama(tmp_path / "float", layers=5)
    seen = {"models": [], "max_live": 0, "materialised": 0}
    build, materialize = gptq_layerwise.build_skeleton, gptq_layerwise.materialize_module

    def recording_build(config):
        model = build(config)
        seen["models"].append(model)
        return model

    def live_layers(model) -> int:
        return sum(any(not p.is_meta for p in layer.parameters()) for layer in model.model.layers)

    def counting_materialize(module, prefix, source, device):
        materialize(module, prefix, source, device)
        model = seen["models"][-1]
        seen["max_live"] = max(seen["max_live"], live_layers(model))
        seen["materialised"] += 1
        # the head and final norm are never needed for calibration: they stay on meta
        assert model.lm_head.weight.is_meta and model.model.norm.weight.is_meta

    monkeypatch.setattr(gptq_layerwise, "build_skeleton", recording_build)
    monkeypatch.setattr(gptq_layerwise, "materialize_module", counting_materialize)
    records = run_layerwise(float_dir)
    assert len(records) == 5 * 7
    assert seen["materialised"] == 1 + 5  # the embedding, then each decoder layer once
    assert seen["max_live"] == 1
    assert live_layers(seen["models"][-1]) == 0  # the last layer was released too


def test_chunked_calibration_equals_one_batch(tmp_path):
    float_dir = tiny_models.make_tiny_llama(tmp_path / "float", layers=2)
    whole = run_layerwise(float_dir, batch_tokens=10_000)
    chunked = run_layerwise(float_dir, batch_tokens=24 * 3)  # chunks of 3, 3, 2 windows
    assert whole.keys() == chunked.keys()
    for name in whole:
        assert torch.equal(whole[name].codes, chunked[name].codes), name
        assert torch.allclose(whole[name].scales, chunked[name].scales, rtol=0, atol=0)
        assert torch.equal(whole[name].zeros, chunked[name].zeros), name


def test_float16_activation_storage_stays_close(tmp_path):
    float_dir = tiny_models.make_tiny_llama(tmp_path / "float", layers=2)
    f32 = run_layerwise(float_dir)
    f16 = run_layerwise(float_dir, activation_dtype="float16")
    differing = sum(int((f32[n].codes != f16[n].codes).sum()) for n in f32)
    total = sum(f32[n].codes.numel() for n in f32)
    # fp16 rounding of the stored hidden states perturbs the Hessians slightly: few codes move
    assert differing / total < 0.02, (differing, total)


def test_true_sequential_calibrates_each_input_set_on_the_quantized_ones_before_it(tmp_path):
    float_dir = tiny_models.make_tiny_llama(tmp_path / "float", layers=2)
    model = gptq_layerwise.build_skeleton(open_float_model(float_dir).model_config)
    layer = model.model.layers[0]
    gptq_layerwise.materialize_module(layer, "model.layers.0", open_float_model(float_dir), torch.device("cpu"))
    linears = {f"model.layers.0.{n}": m for n, m in layer.named_modules() if n.endswith("_proj")}
    hidden = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(0))
    rotary = type(model.model.rotary_emb)(config=model.config)
    positions = torch.arange(8).unsqueeze(0).expand(2, 8)
    kwargs = {2: {"position_embeddings": rotary(hidden, positions), "attention_mask": None}}
    sets = gptq_layerwise._input_sets(layer, linears, hidden, kwargs)
    assert [[n.rsplit(".", 1)[-1] for n in s] for s in sets] == [
        ["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]

    plain = run_layerwise(float_dir)
    sequential = run_layerwise(float_dir, true_sequential=True)
    first = [n for n in plain if n.startswith("model.layers.0.self_attn.") and not n.endswith("o_proj")]
    for name in first:  # the first set sees the same (unquantized) input either way
        assert torch.equal(plain[name].codes, sequential[name].codes), name
    later = [n for n in plain if n not in first]
    assert any(not torch.equal(plain[n].codes, sequential[n].codes) for n in later)


def test_float16_overflow_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    float_dir = tiny_models.make_tiny_llama(tmp_path / "float", layers=1)
    state = load_file(float_dir / "model.safetensors")
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"] * 1e6  # |h| ~ 1e5 > 65504
    save_file(state, float_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="beyond --calibration-dtype float16"):
        run_layerwise(float_dir, activation_dtype="float16")
    assert len(run_layerwise(float_dir, activation_dtype="bfloat16")) == 7


def test_device_and_dtype_flags_are_checked(tmp_path):
    float_dir = tiny_models.make_tiny_llama(tmp_path / "float", layers=1)
    text = random_text(4 * 16, 1)
    with pytest.raises(ConfigError, match="calibration-dtype"):
        quantize_model(float_dir, tmp_path / "a", 4, 16, method="gptq", calibration=text, n_samples=4, seq_len=16,
                       calibration_dtype="float64")
    with pytest.raises(ConfigError, match="--device"):
        quantize_model(float_dir, tmp_path / "b", 4, 16, method="gptq", calibration=text, n_samples=4, seq_len=16,
                       device="tpu")
    with pytest.raises(ConfigError, match="runs on cpu or cuda"):
        quantize_model(float_dir, tmp_path / "b", 4, 16, method="gptq", calibration=text, n_samples=4, seq_len=16,
                       device="meta")
    with pytest.raises(ConfigError, match="batch_tokens"):
        gptq_layerwise.gptq_quantize_layerwise(open_float_model(float_dir), torch.zeros(1, 4, dtype=torch.int64), 4,
                                               16, lambda *a: None, batch_tokens=0)
    with pytest.raises(ConfigError, match="need --method gptq"):
        quantize_model(float_dir, tmp_path / "c", 4, 16, device="cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            quantize_model(float_dir, tmp_path / "d", 4, 16, method="gptq", calibration=text, n_samples=4,
                           seq_len=16, device="cuda")
    assert not (tmp_path / "a").exists() and not (tmp_path / "d").exists()


def test_layers_mixing_attention_types_need_windows_within_the_sliding_window():
    from transformers import Qwen2Config

    # Qwen2 with use_sliding_window: layers from max_window_layers on attend over 32 tokens only
    mixed = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        num_key_value_heads=1, vocab_size=64, use_sliding_window=True, sliding_window=32,
                        max_window_layers=1)
    assert set(mixed.layer_types) == {"full_attention", "sliding_attention"}
    with pytest.raises(ConfigError, match="mix attention types .*--calibration-seq-len 32 or less"):
        gptq_layerwise.check_one_attention_mask(mixed, 64)
    gptq_layerwise.check_one_attention_mask(mixed, 32)  # the masks coincide up to the window
    uniform = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=1, vocab_size=64, sliding_window=32)
    gptq_layerwise.check_one_attention_mask(uniform, 4096)


def test_float_model_disagreeing_with_its_config_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from qalora_export.errors import CheckpointError, UnsupportedModelError

    text = random_text(4 * 16, 1)
    kwargs = dict(bits=4, group_size=16, method="gptq", calibration=text, n_samples=4, seq_len=16)
    missing = tiny_models.make_tiny_llama(tmp_path / "missing", layers=2)
    state = load_file(missing / "model.safetensors")
    del state["model.layers.1.post_attention_layernorm.weight"]
    save_file(state, missing / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="post_attention_layernorm.weight is missing from the float model"):
        quantize_model(missing, tmp_path / "q1", **kwargs)

    def edit_config(path: Path, **fields) -> None:
        config = json.loads((path / "config.json").read_text())
        config.update(fields)
        (path / "config.json").write_text(json.dumps(config))

    narrow = tiny_models.make_tiny_llama(tmp_path / "narrow", layers=1)
    edit_config(narrow, intermediate_size=64)
    with pytest.raises(CheckpointError, match="the config implies"):
        quantize_model(narrow, tmp_path / "q2", **kwargs)
    extra = tiny_models.make_tiny_llama(tmp_path / "extra", layers=2)
    edit_config(extra, num_hidden_layers=1)
    with pytest.raises(UnsupportedModelError, match="belong to no decoder layer"):
        quantize_model(extra, tmp_path / "q3", **kwargs)
    assert not any((tmp_path / f"q{i}").exists() for i in (1, 2, 3))


LAUNCHER = r"""
import json, os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
_, status, usage = os.wait4(proc.pid, 0)
print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "peak_rss": usage.ru_maxrss * 1024,
                  "stderr": proc.stderr.read().decode()[-3000:]}))
"""


def peak_rss_of_gptq(float_dir: Path, out: Path, calib: Path) -> int:
    cmd = [sys.executable, "-m", "qalora_export.cli", "quantize", str(float_dir), "-o", str(out), "--method", "gptq",
           "--group-size", "32", "--calibration-file", str(calib), "--calibration-samples", "4",
           "--calibration-seq-len", "32"]
    # A fixed mmap threshold: glibc's adaptive one otherwise keeps freed layer-sized blocks on its
    # heap for the first few layers, a warm-up of tens of MB that is not memory the pass holds.
    env = dict(os.environ, CI="1", MALLOC_MMAP_THRESHOLD_="1048576")
    done = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, *cmd], capture_output=True, text=True,
                          env=env, timeout=600)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["rc"] == 0, result["stderr"]
    return result["peak_rss"]


def test_gptq_peak_memory_does_not_grow_with_layer_count(tmp_path):
    """Peak RSS of `quantize --method gptq` (fresh subprocess each) at 2 and 14 float32 layers of
    12.6 MB: a pass holding the model (or its mmapped pages) grows by at least the 12 extra layers."""
    shape = dict(hidden=512, intermediate=1536, heads=4, kv_heads=2)
    small = tiny_models.make_tiny_llama(tmp_path / "small", layers=2, **shape)
    large = tiny_models.make_tiny_llama(tmp_path / "large", layers=14, **shape)
    calib = tmp_path / "calib.txt"
    calib.write_text(random_text(4 * 32, 2))
    rss = [peak_rss_of_gptq(d, tmp_path / f"q-{d.name}", calib) for d in (small, large)]
    sizes = [sum(p.stat().st_size for p in d.glob("*.safetensors")) for d in (small, large)]
    extra = sizes[1] - sizes[0]
    assert extra > 120e6, "the extra layers must outweigh RSS noise"
    assert rss[1] - rss[0] < 0.25 * extra, (
        f"peak RSS {rss[0] / 2**20:.0f} MiB at 2 layers, {rss[1] / 2**20:.0f} MiB at 14 "
        f"(+{(rss[1] - rss[0]) / 2**20:.0f} MiB for +{extra / 2**20:.0f} MiB of float weights)")
