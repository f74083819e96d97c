"""``inspect`` (``qalora_export.inspect_artifact.inspect_path``) of adapters and of every format's artifact.

Each description is checked against what the files hold (the adapter's factors and metadata, the
base's fingerprint and layers, the ONNX graph's MatMulNBits nodes, the GGUF's tensor types), is
JSON-serializable, and paths that are none of these are a ConfigError naming the path.
"""

from __future__ import annotations

import json
import shutil

import gguf_helpers
import numpy as np
import pytest
import tiny_models

from qalora_export.checkpoint.adapter_files import ADAPTER_METADATA
from qalora_export.checkpoint.gptq import GPTQCheckpoint
from qalora_export.checkpoint.gptq_config import zero_range
from qalora_export.checkpoint.merged_view import MergedView
from qalora_export.errors import ConfigError
from qalora_export.formats import get_format
from qalora_export.inspect_artifact import inspect_path

# hidden 64, intermediate 128, 2 layers, 4 heads of 16, 2 kv heads: (out, in) of each projection
SHAPES = {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64),
          "gate_proj": (128, 64), "up_proj": (128, 64), "down_proj": (64, 128)}
N_LAYERS = 2 * len(SHAPES)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("inspect")
    base = gguf_helpers.make_bpe_base(root / "base", bits=4, group_size=32)
    # magnitude 0.1: fold shifts up to ~0.7 code units, so GPTQ's rounded zeros differ from the base's
    adapter = tiny_models.make_random_adapter(base, root / "adapter", rank=4, alpha=8.0, seed=0, magnitude=0.1)
    mean = tiny_models.make_random_adapter(base, root / "adapter-mean", rank=2, alpha=3.0, seed=1, pooling="mean")
    w = {"root": root, "base": base, "adapter": adapter, "adapter-mean": mean,
         "gptq": root / "gptq", "onnx": root / "onnx", "gguf": root / "model.gguf"}
    for fmt in ("gptq", "onnx", "gguf"):
        w[f"summary-{fmt}"] = get_format(fmt).export(MergedView.open(base, adapter), w[fmt])
    return w


def _json_roundtrip(info: dict) -> dict:
    loaded = json.loads(json.dumps(info, default=str))
    assert set(loaded) == set(info)
    return loaded


# ------------------------------------------------------------------------------------- adapters


def test_adapter_directory(world):
    info = inspect_path(world["adapter"])
    assert info["kind"] == "QA-LoRA adapter (PEFT layout)"
    assert info["path"] == str(world["adapter"])
    assert info["rank"] == 4 and info["alpha"] == 8.0 and info["scale"] == 2.0
    assert info["pooling"] == "peft"
    assert info["pool_group_size"] == 32 and info["pool_groups"] == "quantization"
    assert info["layers"] == N_LAYERS
    assert sorted(info["target_modules"]) == sorted(SHAPES)
    assert info["base_fingerprint"] == GPTQCheckpoint(world["base"]).fingerprint()
    assert info["peft_use_qalora"] is False  # act-order-free base, but not written contiguous_base
    assert _json_roundtrip(info)["rank"] == 4


def test_adapter_with_other_pooling_rank_and_alpha(world):
    info = inspect_path(world["adapter-mean"])
    assert (info["rank"], info["alpha"], info["scale"], info["pooling"]) == (2, 3.0, 1.5, "mean")
    assert info["layers"] == N_LAYERS
    _json_roundtrip(info)


def test_adapter_without_recorded_pooling(world, tmp_path):
    bare = tmp_path / "bare-adapter"
    shutil.copytree(world["adapter"], bare)
    (bare / ADAPTER_METADATA).unlink()
    info = inspect_path(bare)
    assert info["pooling"] == "not recorded (pass --pooling)"
    assert info["rank"] == 4 and info["layers"] == N_LAYERS
    assert info["base_fingerprint"] is None  # only our metadata file records it
    _json_roundtrip(info)


# ----------------------------------------------------------------------------------------- GPTQ


def test_gptq_base_checkpoint(world):
    info = inspect_path(world["base"])
    ckpt = GPTQCheckpoint(world["base"])
    assert info["kind"] == "gptq checkpoint" and info["path"] == str(world["base"])
    assert info["model_type"] == "llama"
    assert (info["bits"], info["group_size"], info["checkpoint_format"]) == (4, 32, "gptq_v2")
    assert info["quantized_layers"] == N_LAYERS == len(ckpt.quantized_modules)
    assert info["fingerprint"] == ckpt.fingerprint()
    assert info["act_order_g_idx"] is False
    assert info["quantized_params"] == 2 * sum(o * i for o, i in SHAPES.values())
    assert info["layer_shapes"] == {"64x64": 4, "32x64": 4, "128x64": 4, "64x128": 2}
    lo, hi = zero_range(4, "gptq_v2")
    assert lo <= info["true_zero_range"][0] < info["true_zero_range"][1] <= hi  # min-max RTN zeros vary
    assert info["float_tensors"] == len(ckpt.other_tensor_names()) > 0
    assert info["weight_files"] == ["model.safetensors"]
    assert info["bytes"] == (world["base"] / "model.safetensors").stat().st_size
    assert info["qalora_export"] is None  # not written by a merge
    _json_roundtrip(info)


def test_gptq_merged_export_records_the_merge(world):
    info = inspect_path(world["gptq"])
    assert info["kind"] == "gptq checkpoint"
    assert info["quantized_layers"] == N_LAYERS
    assert info["fingerprint"] == GPTQCheckpoint(world["gptq"]).fingerprint()
    assert info["fingerprint"] != GPTQCheckpoint(world["base"]).fingerprint()  # zeros moved
    merge = info["qalora_export"]
    assert merge["merged"] is True and merge["exact"] is False
    assert merge["zeros_moved"] == world["summary-gptq"]["zeros_moved"] > 0
    assert merge["base_fingerprint"] == GPTQCheckpoint(world["base"]).fingerprint()
    _json_roundtrip(info)


def test_gptq_v1_act_order_base(tmp_path):
    base = tiny_models.make_tiny_base(tmp_path / "v1", bits=4, group_size=16, act_order=True,
                                      checkpoint_format="gptq", hidden=32, layers=1, heads=2, kv_heads=1,
                                      intermediate=64)
    info = inspect_path(base)
    assert (info["bits"], info["group_size"], info["checkpoint_format"]) == (4, 16, "gptq")
    assert info["act_order_g_idx"] is True and info["desc_act"] is True
    assert info["quantized_layers"] == 7
    assert info["fingerprint"] == GPTQCheckpoint(base).fingerprint()
    lo, hi = zero_range(4, "gptq")
    assert lo <= info["true_zero_range"][0] <= info["true_zero_range"][1] <= hi
    _json_roundtrip(info)


# ----------------------------------------------------------------------------------------- ONNX


def test_onnx_export(world):
    import onnx

    info = inspect_path(world["onnx"])
    assert info["kind"] == "onnx" and info["path"] == str(world["onnx"])
    # the default export (zero_points "auto") packs q/k/v and gate/up: 4 nodes a layer for 7 modules
    assert N_LAYERS == len(GPTQCheckpoint(world["base"]).quantized_modules)
    assert info["matmulnbits"] == N_LAYERS * 4 // 7
    attrs = info["matmulnbits_attributes"]
    assert attrs["bits"] == 4 and attrs["block_size"] == 32
    qkv = (sum(SHAPES[m][0] for m in ("q_proj", "k_proj", "v_proj")), 64)
    assert (attrs["N"], attrs["K"]) in set(SHAPES.values()) | {qkv, (2 * SHAPES["gate_proj"][0], 64)}
    assert info["op_counts"]["com.microsoft.MatMulNBits"] == N_LAYERS * 4 // 7
    graph = onnx.load(str(world["onnx"] / "model.onnx"), load_external_data=False).graph
    assert info["nodes"] == len(graph.node)
    assert info["inputs"] == [i.name for i in graph.input] and "input_ids" in info["inputs"]
    assert info["outputs"] == [o.name for o in graph.output] and "logits" in info["outputs"]
    assert info["bytes"] == sum(p.stat().st_size for p in world["onnx"].iterdir() if p.is_file())
    loaded = _json_roundtrip(info)
    assert loaded["matmulnbits_attributes"]["bits"] == 4


# ----------------------------------------------------------------------------------------- GGUF


def test_gguf_export(world):
    from gguf import GGUFReader

    info = inspect_path(world["gguf"])
    assert info["kind"] == "gguf" and info["path"] == str(world["gguf"])
    assert info["bytes"] == world["gguf"].stat().st_size
    assert info["tensor_types"]["Q4_1"] == N_LAYERS
    assert info["tensors"] == sum(info["tensor_types"].values()) == len(GGUFReader(str(world["gguf"])).tensors)
    meta = info["metadata"]
    assert meta["general.architecture"] == "llama"
    assert meta["llama.block_count"] == 2
    assert meta["llama.embedding_length"] == 64
    assert meta["llama.attention.head_count"] == 4 and meta["llama.attention.head_count_kv"] == 2
    assert meta["tokenizer.ggml.model"] == "gpt2"
    loaded = _json_roundtrip(info)
    assert loaded["metadata"]["general.architecture"] == "llama"


# --------------------------------------------------------------------------------------- errors


def test_missing_path_is_config_error(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError, match="does not exist") as exc:
        inspect_path(missing)
    assert str(missing) in str(exc.value)


def test_unknown_directory_and_file_are_config_errors(tmp_path):
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "notes.txt").write_text("not a model\n")
    stray = tmp_path / "weights.bin"
    stray.write_bytes(np.random.default_rng(0).integers(0, 256, 256, dtype=np.uint8).tobytes())
    for path in (unknown, stray):
        with pytest.raises(ConfigError, match="not an adapter directory or a known artifact") as exc:
            inspect_path(path)
        assert str(path) in str(exc.value)
        assert "a .gguf file" in str(exc.value)  # the known kinds are listed


def test_corrupt_gguf_is_config_error(tmp_path):
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ConfigError, match="not a readable GGUF file") as exc:
        inspect_path(corrupt)
    assert str(corrupt) in str(exc.value)


def test_truncated_gguf_is_config_error(world, tmp_path):
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(world["gguf"].read_bytes()[:200])  # the real magic and header start, then nothing
    with pytest.raises(ConfigError, match="not a readable GGUF file"):
        inspect_path(truncated)
