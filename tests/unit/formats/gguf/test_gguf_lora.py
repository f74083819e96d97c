"""The plain LoRA as a llama.cpp GGUF adapter (docs/lora.md): layout, write -> read round trip with gguf-py,
llama.cpp with ``lora_path=`` against the unmerged model (within llama.cpp's floor) and against the merged
GGUF, base checks, and the ``lora`` verb end to end (PEFT on GPTQModel + llama.cpp)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf_helpers
import numpy as np
import pytest
import tiny_models
import torch

from qalora_export.checkpoint.merged_view import MergedView
from qalora_export.errors import AdapterError
from qalora_export.formats.gguf import FORMAT as G
from qalora_export.formats.gguf import lora as gguf_lora
from qalora_export.formats.gguf import spec
from qalora_export.formats.gguf.lora_verify import verify_lora
from qalora_export.lora_export import export_lora

PROMPTS = [[1, 40, 77, 100, 200, 30, 31, 250], [10, 20, 30, 40, 50, 60, 70, 80, 90, 300, 5]]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return gguf_helpers.make_bpe_base(tmp_path_factory.mktemp("lora") / "base")


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory) -> Path:
    # magnitude 0.15: the adapter moves llama.cpp's output far beyond its noise floor (checked below)
    return tiny_models.make_random_adapter(base, tmp_path_factory.mktemp("lora-ad") / "adapter", magnitude=0.15)


@pytest.fixture(scope="module")
def base_gguf(base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora-gguf") / "base.gguf"
    G.export(MergedView.open(base, None), out)  # `qalora-export gguf BASE -o base.gguf`: Q4_1, no adapter
    return out


@pytest.fixture(scope="module")
def lora_dir(base, adapter, base_gguf, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("lora-out") / "plain"
    return out, export_lora(adapter, out, base_dir=base, attach=base_gguf)


def test_layout_as_llama_cpp_reads_it(lora_dir, base_gguf):
    from gguf import GGUFReader

    out, summary = lora_dir
    assert summary["gguf_lora"]["files"] == [gguf_lora.LORA_FILE] and summary["weight_check"]["passed"]
    reader = GGUFReader(str(out / gguf_lora.LORA_FILE))
    fields = {k: reader.fields[k].contents() for k in ("general.architecture", "general.type", "adapter.type",
                                                         "adapter.lora.alpha")}
    assert fields == {"general.architecture": "llama", "general.type": "adapter", "adapter.type": "lora",
                      "adapter.lora.alpha": 8.0}
    base_shapes = {t.name: list(t.shape) for t in GGUFReader(str(base_gguf)).tensors}  # ggml ne order
    for t in reader.tensors:
        stem, _, part = t.name.rpartition(".")
        ne = base_shapes[stem]  # [in, out]
        assert list(t.shape) == ([ne[0], 4] if part == "lora_a" else [4, ne[1]])  # a: ne [in, r]; b: ne [r, out]
    assert len(reader.tensors) == 2 * 7 * 2


def test_write_read_round_trip_with_qk_rows_permuted(lora_dir, base_gguf):
    from safetensors.torch import load_file

    out, _ = lora_dir
    alpha, layers = gguf_lora.read_lora(out / gguf_lora.LORA_FILE, base_gguf)
    peft = load_file(str(out / "adapter_model.safetensors"))
    assert alpha == 8.0 and len(layers) == 14
    for module, layer in layers.items():
        assert torch.equal(layer.lora_A, peft[f"base_model.model.{module}.lora_A.weight"])
        assert torch.equal(layer.lora_B, peft[f"base_model.model.{module}.lora_B.weight"])
    # on disk the q rows of B are in llama.cpp's order: the permutation of the base's q weight
    from gguf import GGUFReader

    stored = {t.name: np.array(t.data) for t in GGUFReader(str(out / gguf_lora.LORA_FILE)).tensors}
    b = peft["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].numpy()
    perm = spec.qk_row_permutation(b.shape[0], 4)
    assert np.array_equal(stored["blk.0.attn_q.weight.lora_b"], b[perm]) and not np.array_equal(b[perm], b)


def test_llama_cpp_lora_equals_unmerged_within_the_floor_and_the_merged_gguf(base, adapter, lora_dir, base_gguf,
                                                                             tmp_path):
    out, _ = lora_dir
    result = verify_lora(MergedView.open(base, adapter), out / gguf_lora.LORA_FILE, base_gguf, PROMPTS, tmp_path,
                         n_new=4)
    assert result["passed"], result
    assert result["base_weights"]["passed"] and result["base_weights"]["layers"] == 14
    allowed = result["allowed_mean_kl"]
    assert result["lora"]["mean_kl"] <= allowed and result["lora_vs_merged"]["mean_kl"] <= allowed
    assert result["adapter_effect"]["mean_kl"] > 20 * allowed  # the adapter is far above the tolerance
    assert not list(tmp_path.glob("*.gguf"))
    json.dumps(result)


def test_a_lora_that_is_not_the_adapter_fails(base, adapter, lora_dir, base_gguf, tmp_path):
    """The same LoRA file judged against a 3x stronger adapter must fail (the check has teeth)."""
    from qalora_export.core.adapter import AdapterLayer, QALoRAAdapter

    out, _ = lora_dir
    real = MergedView.open(base, adapter).adapter
    strong = QALoRAAdapter({n: AdapterLayer(layer.lora_A * 3, layer.lora_B) for n, layer in real.layers.items()},
                           rank=real.rank, alpha=real.alpha, pooling=real.pooling,
                           pool_group_size=real.pool_group_size, pool_groups=real.pool_groups)
    model = MergedView(MergedView.open(base, None).base, strong, check_fingerprint=False)
    result = verify_lora(model, out / gguf_lora.LORA_FILE, base_gguf, PROMPTS, tmp_path, n_new=1)
    assert not result["passed"] and result["lora"]["mean_kl"] > result["allowed_mean_kl"]


def test_refuses_the_gguf_of_another_model_and_an_adapter_as_base(adapter, base, lora_dir, tmp_path):
    other = gguf_helpers.make_bpe_base(tmp_path / "other", hidden=96, intermediate=192, heads=4, kv_heads=2)
    other_gguf = tmp_path / "other.gguf"
    G.export(MergedView.open(other, None), other_gguf)
    with pytest.raises(AdapterError, match="another model"):
        export_lora(adapter, tmp_path / "x", base_dir=base, attach=other_gguf)
    out, _ = lora_dir
    with pytest.raises(AdapterError, match="itself a GGUF adapter"):
        export_lora(adapter, tmp_path / "y", base_dir=base, attach=out / gguf_lora.LORA_FILE)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_lora_verb_end_to_end_peft_and_llama_cpp(base, adapter, base_gguf, tmp_path):
    """``qalora-export lora ADAPTER -o DIR --gguf BASE.gguf --verify BASE``: exit 0, both runtimes pass."""
    from qalora_export.cli import main

    out, report = tmp_path / "plain", tmp_path / "report.json"
    code = main(["lora", str(adapter), "-o", str(out), "--gguf", str(base_gguf), "--verify", str(base),
                 "--report", str(report)])
    result = json.loads(report.read_text())
    assert code == 0, result
    runtime = result["runtime"]
    assert runtime["gptq"]["passed"] and runtime["gguf"]["passed"]
    peft = runtime["gptq"]
    # PEFT on GPTQModel vs our unmerged forward: at the base's own floor, while the adapter moves logits far more
    assert peft["lora_vs_unmerged"]["max_abs_logit_diff"] <= 4 * peft["floor"]["max_abs_logit_diff"] + 1e-3
    assert peft["adapter_effect"]["max_abs_logit_diff"] > 50 * (4 * peft["floor"]["max_abs_logit_diff"] + 1e-3)
    assert sorted(p.name for p in out.iterdir()) == ["adapter.gguf", "adapter_config.json",
                                                     "adapter_model.safetensors", "qalora_export_lora.json"]
    # bad input: exit 2, nothing written (pool groups unknown without the base)
    assert main(["lora", str(adapter), "-o", str(tmp_path / "nobase")]) == 2
    assert not (tmp_path / "nobase").exists()


def test_base_checks_name_what_is_wrong(lora_dir, base_gguf, tmp_path):
    from qalora_export.core.plain_lora import PlainLoRA, PlainLoRALayer
    from qalora_export.errors import CheckpointError, UnsupportedModelError

    facts = gguf_lora.base_facts(base_gguf)
    layer = PlainLoRALayer(torch.ones(4, 64), torch.ones(64, 4))
    one = PlainLoRA({"model.layers.0.self_attn.q_proj": layer}, 4, 8.0, [])
    assert gguf_lora.check_base(one, facts, base_gguf) == {"model.layers.0.self_attn.q_proj": "blk.0.attn_q.weight"}
    with pytest.raises(UnsupportedModelError, match="architecture"):
        gguf_lora.check_base(one, {**facts, "arch": "phi3"}, base_gguf)
    with pytest.raises(AdapterError, match="blocks"):
        gguf_lora.check_base(PlainLoRA({"model.layers.5.self_attn.q_proj": layer}, 4, 8.0, []), facts, base_gguf)
    with pytest.raises(AdapterError, match="has no tensor"):
        gguf_lora.check_base(one, {**facts, "shapes": {}}, base_gguf)
    with pytest.raises(UnsupportedModelError, match="no llama.cpp tensor name"):
        gguf_lora.check_base(PlainLoRA({"model.layers.0.mlp.act": layer}, 4, 8.0, []), facts, base_gguf)
    with pytest.raises(CheckpointError, match="not a GGUF LoRA adapter"):
        gguf_lora.read_lora(base_gguf, base_gguf)
    from qalora_export.errors import ConfigError
    from qalora_export.formats.gguf.lora_verify import lora_logits_and_greedy

    with pytest.raises(ConfigError, match="cannot load"):
        lora_logits_and_greedy(base_gguf, tmp_path / "missing.gguf", PROMPTS, 1)
