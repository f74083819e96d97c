"""Tests of qalora_export.core.adapter: adapter records, PEFT-layout I/O, pooling-convention inference."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qalora_export.checkpoint.adapter_files import ADAPTER_CONFIG, ADAPTER_METADATA, ADAPTER_WEIGHTS, load_adapter, save_adapter
from qalora_export.core.adapter import AdapterLayer, QALoRAAdapter, adapter_delta, pooling_factor
from qalora_export.errors import AdapterError, OutputExistsError

Q = "model.layers.0.self_attn.q_proj"
DOWN = "model.layers.0.mlp.down_proj"


def make_adapter(pooling: str = "peft", pool_groups: str = "quantization", rank: int = 4) -> QALoRAAdapter:
    gen = torch.Generator().manual_seed(0)
    layers = {
        Q: AdapterLayer(torch.randn(rank, 2, generator=gen), torch.randn(64, rank, generator=gen)),
        DOWN: AdapterLayer(torch.randn(rank, 4, generator=gen), torch.randn(64, rank, generator=gen)),
    }
    return QALoRAAdapter(layers=layers, rank=rank, alpha=16.0, pooling=pooling, pool_group_size=32,
                         pool_groups=pool_groups, base_fingerprint="sha256:abc",
                         target_modules=["q_proj", "down_proj"], extra={"train_steps": 7})


def saved(tmp_path: Path, **kwargs) -> Path:
    out = tmp_path / "adapter"
    save_adapter(make_adapter(**kwargs), out, base_model_path="base")
    return out


def edit_json(path: Path, **changes) -> None:
    obj = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            obj.pop(k, None)
        else:
            obj[k] = v
    path.write_text(json.dumps(obj))


def rewrite_weights(directory: Path, fn) -> None:
    path = directory / ADAPTER_WEIGHTS
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    fn(tensors)
    save_file(tensors, str(path))


def no_partials(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if p.name.endswith(".partial")]


# ----------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("pooling, pool_groups", [("peft", "quantization"), ("peft", "consecutive"),
                                                  ("mean", "consecutive"), ("sum", "quantization")])
def test_save_load_round_trip(tmp_path, pooling, pool_groups):
    adapter = make_adapter(pooling, pool_groups)
    out = tmp_path / "adapter"
    save_adapter(adapter, out, base_model_path="some/base")
    assert sorted(p.name for p in out.iterdir()) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_METADATA])
    back = load_adapter(out)
    assert back.rank == 4 and back.alpha == 16.0 and back.scale == 4.0
    assert back.pooling == pooling and back.pool_groups == pool_groups and back.pool_group_size == 32
    assert back.base_fingerprint == "sha256:abc" and back.extra == {"train_steps": 7}
    assert sorted(back.target_modules) == ["down_proj", "q_proj"]
    assert set(back.layers) == {Q, DOWN}
    for name, layer in adapter.layers.items():
        assert torch.equal(back.layers[name].lora_A, layer.lora_A)
        assert torch.equal(back.layers[name].lora_B, layer.lora_B)
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    # PEFT's layout: PEFT reads use_qalora only for its own convention on consecutive groups
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 16.0
    assert config["use_qalora"] == (pooling == "peft" and pool_groups == "consecutive")
    assert config["qalora_group_size"] == 32 and config["base_model_name_or_path"] == "some/base"
    with safe_open(str(out / ADAPTER_WEIGHTS), "pt") as f:
        assert set(f.keys()) == {f"base_model.model.{n}.lora_{p}.weight" for n in (Q, DOWN) for p in "AB"}
    assert no_partials(tmp_path)


def test_save_refuses_existing_output_and_leaves_it_alone(tmp_path):
    out = saved(tmp_path)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(OutputExistsError, match="already exists.*--overwrite"):
        save_adapter(make_adapter("mean"), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    save_adapter(make_adapter("mean"), out, overwrite=True)
    assert load_adapter(out).pooling == "mean"
    assert no_partials(tmp_path) and not [p for p in tmp_path.iterdir() if p.name.endswith(".old")]


def test_peft_key_variants_are_read(tmp_path):
    out = saved(tmp_path)

    def rename(t):
        for k in list(t):
            t[k.replace(".weight", ".default.weight")] = t.pop(k)
        t["base_model.model.lm_head.modules_to_save.weight"] = torch.zeros(2, 2)  # not a LoRA factor
    rewrite_weights(out, rename)
    assert set(load_adapter(out).layers) == {Q, DOWN}


# ----------------------------------------------------------------------------- convention inference


def test_peft_dir_without_our_metadata_is_peft(tmp_path):
    out = saved(tmp_path, pool_groups="consecutive")
    (out / ADAPTER_METADATA).unlink()
    adapter = load_adapter(out)
    assert adapter.pooling == "peft" and adapter.pool_group_size == 32 and adapter.pool_groups == "consecutive"
    assert adapter.base_fingerprint is None
    assert load_adapter(out, pooling="peft").pooling == "peft"  # an agreeing flag is fine
    with pytest.raises(AdapterError, match=r"--pooling mean contradicts .*use_qalora=true means PEFT's convention"):
        load_adapter(out, pooling="mean")


def test_dir_with_neither_needs_the_pooling_flag(tmp_path):
    out = saved(tmp_path, pool_groups="consecutive")
    (out / ADAPTER_METADATA).unlink()
    edit_json(out / ADAPTER_CONFIG, use_qalora=None, qalora_group_size=None)
    with pytest.raises(AdapterError, match=r"does not record its pooling convention.*pass --pooling mean .*sum .*peft"):
        load_adapter(out)
    adapter = load_adapter(out, pooling="mean")
    assert adapter.pooling == "mean" and adapter.pool_group_size == 0  # per layer, from A's shape
    assert adapter.layer_pool_group_size(Q, 64) == 32 and adapter.layer_pool_group_size(DOWN, 128) == 32
    edit_json(out / ADAPTER_CONFIG, use_qalora=False)
    with pytest.raises(AdapterError, match="--pooling"):
        load_adapter(out)


def test_flag_contradicting_metadata_is_refused(tmp_path):
    out = saved(tmp_path, pooling="sum")
    with pytest.raises(AdapterError, match=r"--pooling mean contradicts the convention recorded in .*qalora_export.json \(sum\)"):
        load_adapter(out, pooling="mean")
    assert load_adapter(out, pooling="sum").pooling == "sum"
    with pytest.raises(AdapterError, match=r"--pooling 'avg' is not a convention"):
        load_adapter(out, pooling="avg")


@pytest.mark.parametrize("change, match", [
    ({"format_version": 99}, r"format_version 99 is not one this qalora-export reads"),
    ({"format_version": None}, r"format_version None"),
    ({"pooling": "median"}, r"pooling 'median' is not one of"),
    ({"pool_groups": "random"}, r"pool_groups 'random' is not consecutive\|quantization"),
    ({"pool_group_size": 0}, r"'pool_group_size' must be a positive integer, got 0"),
])
def test_bad_metadata(tmp_path, change, match):
    out = saved(tmp_path)
    edit_json(out / ADAPTER_METADATA, **change)  # None removes the field
    with pytest.raises(AdapterError, match=match):
        load_adapter(out)


@pytest.mark.parametrize("change, match", [
    ({"r": None}, r"field 'r' must be a positive integer, got None"),
    ({"r": 0}, r"field 'r' must be a positive integer, got 0"),
    ({"lora_alpha": None}, r"field 'lora_alpha' must be a finite number, got None"),
    ({"lora_alpha": "16"}, r"field 'lora_alpha' must be a finite number"),
    ({"use_dora": True}, r"DoRA adapters cannot be folded"),
    ({"use_rslora": True}, r"use_rslora"),
])
def test_bad_adapter_config(tmp_path, change, match):
    out = saved(tmp_path)
    edit_json(out / ADAPTER_CONFIG, **change)
    with pytest.raises(AdapterError, match=match):
        load_adapter(out)


def test_nan_alpha_in_json_is_refused(tmp_path):
    out = saved(tmp_path)
    text = (out / ADAPTER_CONFIG).read_text().replace('"lora_alpha": 16.0', '"lora_alpha": NaN')
    (out / ADAPTER_CONFIG).write_text(text)
    with pytest.raises(AdapterError, match="'lora_alpha' must be a finite number, got nan"):
        load_adapter(out)


# ----------------------------------------------------------------------------- bad files and tensors


def test_missing_files(tmp_path):
    with pytest.raises(AdapterError, match="adapter directory .*nope does not exist"):
        load_adapter(tmp_path / "nope")
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        out = saved(tmp_path / name)
        (out / name).unlink()
        with pytest.raises(AdapterError, match=rf"is not an adapter directory: it needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}"):
            load_adapter(out)
    out = saved(tmp_path / "json")
    (out / ADAPTER_CONFIG).write_text("{")
    with pytest.raises(AdapterError, match="adapter_config.json is not valid JSON"):
        load_adapter(out)


@pytest.mark.parametrize("cut", [0, 7, 100, -40])
def test_truncated_safetensors(tmp_path, cut):
    out = saved(tmp_path)
    path = out / ADAPTER_WEIGHTS
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    with pytest.raises(AdapterError, match=r"adapter_model.safetensors is not a readable safetensors file"):
        load_adapter(out)


def test_corrupted_header(tmp_path):
    out = saved(tmp_path)
    path = out / ADAPTER_WEIGHTS
    data = bytearray(path.read_bytes())
    data[10:14] = b"\xff\xff\xff\xff"
    path.write_bytes(bytes(data))
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        load_adapter(out)


@pytest.mark.parametrize("which, value", [("B", float("nan")), ("A", float("inf")), ("B", float("-inf"))])
def test_non_finite_factors_are_refused(tmp_path, which, value):
    out = saved(tmp_path)

    def poison(t):
        t[f"base_model.model.{Q}.lora_{which}.weight"][1, 1] = value
    rewrite_weights(out, poison)
    with pytest.raises(AdapterError, match=rf"lora_{which}.weight contains NaN or inf.*folding it would corrupt the model"):
        load_adapter(out)


def test_wrong_rank_shapes_are_refused(tmp_path):
    out = saved(tmp_path)

    def bad_rank(t):
        t[f"base_model.model.{Q}.lora_A.weight"] = torch.zeros(5, 2)
    rewrite_weights(out, bad_rank)
    with pytest.raises(AdapterError, match=rf"module {Q} has lora_A \(5, 2\) and lora_B \(64, 4\); rank r=4 needs"):
        load_adapter(out)

    out2 = saved(tmp_path / "b")

    def bad_b(t):
        t[f"base_model.model.{DOWN}.lora_B.weight"] = torch.zeros(64, 4, 1)
    rewrite_weights(out2, bad_b)
    with pytest.raises(AdapterError, match=rf"module {DOWN} has lora_A \(4, 4\) and lora_B \(64, 4, 1\)"):
        load_adapter(out2)


def test_half_a_pair_or_no_factors_is_refused(tmp_path):
    out = saved(tmp_path)
    rewrite_weights(out, lambda t: t.pop(f"base_model.model.{Q}.lora_B.weight"))
    with pytest.raises(AdapterError, match=f"module {Q} has lora_A but not both A and B"):
        load_adapter(out)
    out2 = saved(tmp_path / "b")
    rewrite_weights(out2, lambda t: [t.pop(k) for k in list(t)] and t.update(x=torch.zeros(1)))
    with pytest.raises(AdapterError, match="holds no lora_A/lora_B tensors"):
        load_adapter(out2)


# ----------------------------------------------------------------------------- records


def test_pooling_factors_and_delta():
    assert pooling_factor("mean", 128, 32) == 1 / 32
    assert pooling_factor("sum", 128, 32) == 1.0
    assert pooling_factor("peft", 128, 32) == 4 / 32
    with pytest.raises(AdapterError, match="unknown pooling convention 'avg'"):
        pooling_factor("avg", 128, 32)
    adapter = make_adapter("peft")
    layer = adapter.layers[DOWN]
    expected = (layer.lora_B.double() @ layer.lora_A.double()) * (16.0 / 4) * (4 / 32)
    assert torch.allclose(adapter_delta(adapter, DOWN, 128), expected, rtol=1e-15, atol=0)


def test_layer_pool_group_size_checks_the_base_width():
    adapter = make_adapter()
    assert adapter.layer_pool_group_size(Q, 64) == 32
    with pytest.raises(AdapterError, match=r"lora_A has 2 pooled features, which does not divide the layer's 63"):
        adapter.layer_pool_group_size(Q, 63)
    with pytest.raises(AdapterError, match="so its pooling group size is 64, but the adapter records 32"):
        adapter.layer_pool_group_size(Q, 128)


def test_load_does_not_modify_the_adapter_dir(tmp_path):
    out = saved(tmp_path)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    load_adapter(out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert math.isclose(load_adapter(out).scale, 4.0)


# ------------------------------------------------------------------------------- lazy factors


def test_loaded_factors_are_read_one_module_at_a_time(tmp_path, monkeypatch):
    """load_adapter checks every tensor once and keeps none; a lookup reads only that module's A
    and B (kept until another module is read); assigned modules live in memory."""
    import qalora_export.checkpoint.adapter_files as adapter_module

    original = make_adapter()
    reads = []
    real = adapter_module._checked_tensor

    def spy(f, key, path):
        reads.append(key)
        return real(f, key, path)

    monkeypatch.setattr(adapter_module, "_checked_tensor", spy)
    loaded = load_adapter(saved(tmp_path))
    assert len(reads) == 4 and len(set(reads)) == 4  # the whole file checked once at load
    reads.clear()
    assert set(loaded.layers) == {Q, DOWN} and Q in loaded.layers and len(loaded.layers) == 2
    assert reads == []  # names, membership and length come from the header
    for _ in range(2):
        assert torch.equal(loaded.layers[Q].lora_A, original.layers[Q].lora_A)
        assert torch.equal(loaded.layers[Q].lora_B, original.layers[Q].lora_B)
    assert sorted(reads) == sorted([f"base_model.model.{Q}.lora_A.weight", f"base_model.model.{Q}.lora_B.weight"])
    reads.clear()
    assert torch.equal(loaded.layers[DOWN].lora_B, original.layers[DOWN].lora_B) and len(reads) == 2
    replacement = AdapterLayer(torch.ones(4, 2), torch.ones(64, 4))
    loaded.layers[Q] = replacement
    assert loaded.layers[Q] is replacement and len(reads) == 2
    del loaded.layers[DOWN]
    assert list(loaded.layers) == [Q]


def test_factors_damaged_after_loading_are_refused_when_read(tmp_path):
    """The lazy read checks each tensor again: a file changed under a loaded adapter to hold NaN
    is refused with the load-time message, not folded."""
    directory = saved(tmp_path)
    loaded = load_adapter(directory)

    def poison(tensors):
        for key in tensors:
            if key.endswith("lora_B.weight"):
                tensors[key] = torch.full_like(tensors[key], float("nan"))

    rewrite_weights(directory, poison)
    with pytest.raises(AdapterError, match="contains NaN or inf"):
        loaded.layers[DOWN]
