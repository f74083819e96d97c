"""QA-LoRA -> plain LoRA (core/plain_lora.py, lora_export.py): the delta is the QA-LoRA delta for every
pooling convention and both kinds of pooling groups (property test), the stored-factor check has teeth,
typed errors, and PEFT loads the written folder onto a float model with exactly our delta."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tiny_models
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qalora_export.core.adapter import AdapterLayer, QALoRAAdapter, adapter_delta
from qalora_export.core.plain_lora import (
    PlainLoRALayer,
    check_convertible,
    check_layer_delta,
    column_pools,
    plain_factors,
    store,
)
from qalora_export.errors import AdapterError, FormatLimitError
from qalora_export.lora_export import export_lora


def _adapter(rank: int, pooled: int, p: int, out: int, pooling: str, pool_groups: str, seed: int) -> QALoRAAdapter:
    gen = torch.Generator().manual_seed(seed)
    layer = AdapterLayer(torch.randn(rank, pooled, generator=gen), torch.randn(out, rank, generator=gen))
    return QALoRAAdapter({"m": layer}, rank=rank, alpha=float(2 * rank), pooling=pooling, pool_group_size=p,
                         pool_groups=pool_groups)


@settings(max_examples=40, deadline=None)
@given(rank=st.integers(1, 8), pooled=st.integers(1, 9), p=st.sampled_from([1, 2, 3, 8, 16]), out=st.integers(1, 12),
       pooling=st.sampled_from(["mean", "sum", "peft"]), pool_groups=st.sampled_from(["consecutive", "quantization"]),
       dtype=st.sampled_from(["float32", "float16"]), seed=st.integers(0, 2**16))
def test_plain_delta_is_the_qalora_delta(rank, pooled, p, out, pooling, pool_groups, dtype, seed):
    adapter = _adapter(rank, pooled, p, out, pooling, pool_groups, seed)
    in_features = pooled * p
    g_idx = None
    if pool_groups == "quantization":  # an act-order base: groups are a random permutation of the columns
        perm = torch.randperm(in_features, generator=torch.Generator().manual_seed(seed))
        g_idx = (torch.arange(in_features) // p)[perm]
    pools = column_pools(adapter, "m", in_features, g_idx)
    a_plain, b = plain_factors(adapter, "m", pools)
    exact = adapter.scale * (b @ a_plain)
    reference = adapter_delta(adapter, "m", in_features)[:, pools]
    assert torch.allclose(exact, reference, rtol=1e-12, atol=1e-300)  # float64: the same delta
    stored = PlainLoRALayer(store(a_plain, dtype, "A"), store(b, dtype, "B"))
    check = check_layer_delta(adapter, "m", stored, pools, dtype)
    assert check["passed"], check
    if pooled > 1 and float(reference.abs().max()) > 0:  # a wrong a(i) breaks the bound
        wrong = PlainLoRALayer(store(a_plain.roll(p, dims=1), dtype, "A"), stored.lora_B)
        shifted = reference.roll(p, dims=1)
        if not torch.allclose(shifted, reference, rtol=1e-2):
            assert not check_layer_delta(adapter, "m", wrong, pools, dtype)["passed"]


def test_wrong_pooling_factor_fails_the_check():
    adapter = _adapter(4, 6, 8, 5, "mean", "consecutive", 0)
    pools = column_pools(adapter, "m", 48, None)
    a_plain, b = plain_factors(adapter, "m", pools)
    wrong = PlainLoRALayer(store(a_plain * 8, "float32", "A"), store(b, "float32", "B"))  # k of "sum", not "mean"
    assert not check_layer_delta(adapter, "m", wrong, pools, "float32")["passed"]


def test_typed_errors():
    adapter = _adapter(2, 4, 8, 3, "peft", "quantization", 1)
    with pytest.raises(AdapterError, match="--base"):
        column_pools(adapter, "m", 32, None)
    with pytest.raises(AdapterError, match="another base"):
        column_pools(adapter, "m", 32, torch.arange(32) // 4)  # 8 groups for 4 pooled features
    with pytest.raises(FormatLimitError, match="float16"):
        store(torch.tensor([1e6], dtype=torch.float64), "float16", "A")
    adapter.extra = {"integer_zeros": True, "zero_range": [0, 15]}
    with pytest.raises(AdapterError, match="integer-zeros"):
        check_convertible(adapter)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("plain-lora")
    base = tiny_models.make_tiny_base(root / "base", group_size=16)
    adapter = tiny_models.make_random_adapter(base, root / "adapter", pooling="mean", pool_groups="consecutive",
                                              magnitude=0.3)
    return base, adapter


def test_peft_applies_the_written_folder_with_our_delta(tiny, tmp_path):
    """PeftModel.from_pretrained on the float model: each layer's LoRA delta equals s k (B A)[:, a(i)]."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, adapter_dir = tiny
    out = tmp_path / "plain"
    summary = export_lora(adapter_dir, out)  # consecutive pooling: no base needed
    assert summary["weight_check"]["passed"] and summary["layers"] == 14
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_qalora"] is False and config["peft_type"] == "LORA" and "qalora_group_size" not in config
    meta = json.loads((out / "qalora_export_lora.json").read_text())
    assert meta["pooling"] == "mean" and meta["pooling_factors_k"] == [1 / 16]

    from qalora_export.checkpoint.adapter_files import load_adapter

    qalora = load_adapter(adapter_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base) + "-float"), str(out))
    checked = 0
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            plain_name = name
            in_features = module.in_features
            reference = adapter_delta(qalora, plain_name, in_features)[:, torch.arange(in_features) // 16]
            delta = module.get_delta_weight("default").to(torch.float64)
            assert float((delta - reference).abs().max()) <= 1e-6 * float(reference.abs().max())
            checked += 1
    assert checked == 14
    ids = torch.randint(4, tiny_models.TINY_VOCAB, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with_lora = model(input_ids=ids).logits
        with model.disable_adapter():
            without = model(input_ids=ids).logits
    assert float((with_lora - without).abs().max()) > 0.1  # the adapter visibly moves the output


def test_quantization_pooled_adapter_needs_the_base_and_is_refused_before_writing(tiny, tmp_path):
    base, _ = tiny
    adapter = tiny_models.make_random_adapter(base, tmp_path / "q", pool_groups="quantization")
    with pytest.raises(AdapterError, match="--base"):
        export_lora(adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert export_lora(adapter, tmp_path / "out", base_dir=base)["pool_groups_from"].startswith("the GPTQ base")


def test_bad_input_errors_of_the_verb(tiny, tmp_path, monkeypatch):
    """Typed errors of lora_export / the verb: exit 2 for bad input, exit 1 (nothing written) for a failed check."""
    from qalora_export import lora_export
    from qalora_export.cli import main
    from qalora_export.core.plain_lora import PlainLoRA
    from qalora_export.errors import ConfigError
    from qalora_export.formats import get_format

    base, adapter_dir = tiny
    assert main(["lora", str(adapter_dir), "-o", str(tmp_path / "a"), "--base", str(base),
                 "--verify", str(tmp_path)]) == 2  # two different bases
    with pytest.raises(ConfigError, match="no format attaches a LoRA"):
        lora_export.lora_format(tmp_path / "missing.bin")
    with pytest.raises(ConfigError, match="attaches no plain LoRA"):
        get_format("onnx").export_lora(PlainLoRA({}, 1, 1.0, []), tmp_path, base)
    unrecorded = tmp_path / "unrecorded"
    import shutil

    shutil.copytree(adapter_dir, unrecorded)
    (unrecorded / "qalora_export.json").unlink()  # an official-code adapter: no metadata, no group size
    config = json.loads((unrecorded / "adapter_config.json").read_text())
    config.pop("qalora_group_size")
    (unrecorded / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="does not record its pooling group size"):
        lora_export.export_lora(unrecorded, tmp_path / "b", pooling="mean")
    assert lora_export.export_lora(unrecorded, tmp_path / "b", pooling="mean", base_dir=base)["weight_check"]["passed"]
    failing = {"max_abs_error": 1.0, "max_abs_delta": 1.0, "allowed_margin": -1.0, "passed": False}
    monkeypatch.setattr(lora_export, "check_layer_delta", lambda *a: failing)
    assert main(["lora", str(adapter_dir), "-o", str(tmp_path / "c")]) == 1
    assert not (tmp_path / "c").exists()


def test_gptq_base_of_another_model_is_refused(tiny, tmp_path):
    from qalora_export.core.plain_lora import PlainLoRA
    from qalora_export.formats import get_format

    base, _ = tiny
    gptq = get_format("gptq")
    layer = PlainLoRALayer(torch.ones(2, 64), torch.ones(64, 2))
    assert gptq.export_lora(PlainLoRA({"model.layers.0.self_attn.q_proj": layer}, 2, 4.0, []), tmp_path, base)["files"] == []
    with pytest.raises(AdapterError, match="does not quantize"):
        gptq.export_lora(PlainLoRA({"model.layers.9.self_attn.q_proj": layer}, 2, 4.0, []), tmp_path, base)
    wide = PlainLoRALayer(torch.ones(2, 96), torch.ones(64, 2))
    with pytest.raises(AdapterError, match="another model"):
        gptq.export_lora(PlainLoRA({"model.layers.0.self_attn.q_proj": wide}, 2, 4.0, []), tmp_path, base)
