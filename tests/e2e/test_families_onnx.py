"""ONNX export of the model families people fine-tune, each with its real tokenizer and chat template
(``tests/family_models.py``: Llama 3 with llama3 rope scaling and an untied head, Mistral with a
sliding window and a SentencePiece tokenizer, Qwen2 with q/k/v biases and tied embeddings, Qwen3
with q/k norms and head_dim 64 != 128 / 4), against the unmerged PyTorch model:

- the default export (``--zero-points auto``) holds the fold exactly (weight level), runs in
  onnxruntime within the runtime tolerances (logits, KL, top-1, KV cache, greedy) and in
  onnxruntime-genai, whose greedy continuation of real chat prompts is PyTorch's; the adapter moves
  the reference far beyond those tolerances, so the checks can fail;
- ``auto``'s two other forms: the low-rank residual ``U @ V`` (a rank-1 adapter) and plain uint8
  zero-points (an adapter with integral zero shifts, also exported as ``--zero-points uint8``);
- ``genai_config.json``: genai's model type, every end token of the family, a pad that no rendered
  chat prompt holds, the context length;
- the command line: ``merge --to onnx`` and ``verify`` on one family (Mistral).

Each family's model is built once per session (``family_model`` in conftest.py) and exported once
per module. Measured numbers: docs/onnx.md.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import family_models
import numpy as np
import pytest
import tiny_models
import torch

from qalora_export.checkpoint.merged_view import MergedView
from qalora_export.formats import get_format
from qalora_export.formats.onnx import spec

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxruntime_genai")

FAMILIES = family_models.FAMILY_NAMES

#: Chat conversations rendered with each family's own template: a question, and a multi-turn chat
#: whose earlier answer ends with the family's end-of-turn token (<|eot_id|>, </s>, <|im_end|>).
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another one?"}],
]

#: genai's ``model.type`` and the end tokens genai must stop at, per family.
EXPECTED = {
    "llama3": ("llama", ("<|eot_id|>", "<|end_of_text|>")),
    "mistral": ("mistral", ("</s>",)),
    "qwen2": ("qwen2", ("<|im_end|>", "<|endoftext|>")),
    "qwen3": ("qwen3", ("<|im_end|>", "<|endoftext|>")),
}
#: The token that ends a turn in rendered chat prompts (so that a pad equal to it would matter).
END_OF_TURN = {"llama3": "<|eot_id|>", "mistral": "</s>", "qwen2": "<|im_end|>", "qwen3": "<|im_end|>"}


@pytest.fixture(scope="module")
def exported(family_model, tmp_path_factory):
    """``exported(family) -> (FamilyModel, OUT_DIR, summary)``: the default export, once per module."""
    root = tmp_path_factory.mktemp("families-onnx")
    done: dict = {}

    def get(family: str):
        if family not in done:
            fm = family_model(family)
            out = root / family
            summary = get_format("onnx").export(MergedView.open(fm.base_dir, fm.adapter_dir), out)
            done[family] = (fm, out, summary)
        return done[family]

    return get


@functools.lru_cache(maxsize=8)
def tokenizer(tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def chat_prompts(tokenizer_dir: Path) -> list[list[int]]:
    tok = tokenizer(tokenizer_dir)
    return [list(tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False))
            for c in CONVERSATIONS]


def token_ids(tokenizer_dir: Path, tokens) -> list[int]:
    tok = tokenizer(tokenizer_dir)
    ids = [tok.convert_tokens_to_ids(t) for t in tokens]
    assert all(i is not None and i != tok.unk_token_id for i in ids), (tokens, ids)
    return ids


def reference_logits(base: Path, adapter, prompts) -> list[np.ndarray]:
    """The unmerged PyTorch model's logits per prompt (float64); ``adapter`` None: the base alone."""
    from qalora_export.modeling.model import build_model
    from qalora_export.training.evaluate import cached_base_weights

    model = MergedView.open(base, adapter)
    ref = build_model(model.base, model.adapter)
    with cached_base_weights(ref), torch.no_grad():
        return [ref(torch.tensor([p])).logits[0].to(torch.float64).numpy() for p in prompts]


def onnx_logits(out: Path, prompts) -> list[np.ndarray]:
    from qalora_export.formats.onnx.runtime import OrtDecoder

    decoder = OrtDecoder(out, providers=["CPUExecutionProvider"])
    return [decoder.logits(p).astype(np.float64) for p in prompts]


def compare(ref: list[np.ndarray], got: list[np.ndarray]) -> dict:
    from qalora_export.runtimes.compare import compare_logits

    stats = compare_logits(ref, got)
    scale = max(float(np.abs(r).max()) for r in ref)
    return {"max_dlogit_rel": stats.max_abs_logit_diff / scale, "mean_kl": stats.mean_kl,
            "top1": stats.top1_agreement}


def weight_level(fm, out: Path) -> dict:
    from qalora_export.verify import weight_report

    report = weight_report(MergedView.open(fm.base_dir, fm.adapter_dir), get_format("onnx"), out)
    assert report["passed"] and not report["missing_layers"], report
    assert report["max_rel_vs_unmerged"] <= spec.WEIGHT_TOLERANCE
    return report


def graph(out: Path):
    import onnx

    return onnx.load(str(out / spec.MODEL_FILE), load_external_data=False)


def initializer(out: Path, name: str) -> np.ndarray:
    from qalora_export.formats.onnx.read import _initializer_array

    tensor = next(t for t in graph(out).graph.initializer if t.name == name)
    return _initializer_array(tensor, out)


def attribute(node, name: str):
    from onnx import helper

    return next(helper.get_attribute_value(a) for a in node.attribute if a.name == name)


# ----------------------------------------------------------------------------------- the default export


@pytest.mark.parametrize("family", FAMILIES)
def test_default_export_is_the_unmerged_model_in_onnxruntime_and_genai(exported, family, tmp_path):
    from qalora_export.formats import get_format
    from qalora_export.runtimes.isolation import call_isolated

    fm, out, summary = exported(family)
    assert summary["exact"] and summary["zero_point_form"] == "split" and summary["packed"]
    weights = weight_level(fm, out)
    prompts = chat_prompts(out)
    genai = json.loads((out / spec.GENAI_CONFIG_FILE).read_text())["model"]
    end_of_turn = token_ids(out, (END_OF_TURN[family],))[0]
    assert any(end_of_turn in p for p in prompts)  # a pad equal to it would mask real prompt tokens
    assert all(genai["pad_token_id"] not in p for p in prompts)

    # verify's runtime level, in a child process as verify runs it (runtimes/isolation.py)
    report = call_isolated("qalora_export.verify:runtime_level",
                           {"fmt": "onnx", "artifact": str(out), "base_dir": str(fm.base_dir),
                            "adapter_dir": str(fm.adapter_dir), "pooling": None, "prompts": prompts, "device": "cpu"},
                           get_format("onnx").runtime, timeout=900)
    assert report["passed"], report["checks"]
    assert report["logits"]["max_abs_logit_diff_rel"] <= spec.RUNTIME_MAX_DLOGIT_REL
    assert report["logits"]["mean_kl"] <= spec.RUNTIME_MAX_KL
    greedy = report["greedy"]
    assert greedy["genai_skipped"] == 0  # genai ran the whole chat prompts, pad-free
    assert all(len(t) >= 1 for t in greedy["reference"])

    # the check can fail: the adapter moves the reference far beyond the tolerances
    with_adapter = reference_logits(fm.base_dir, fm.adapter_dir, prompts)
    moved = compare(with_adapter, reference_logits(fm.base_dir, None, prompts))
    assert moved["max_dlogit_rel"] > 20 * spec.RUNTIME_MAX_DLOGIT_REL
    assert moved["mean_kl"] > 100 * spec.RUNTIME_MAX_KL
    print(f"\n{family}: weights max rel {weights['max_rel_vs_unmerged']:.2e}; |dlogit| "
          f"{report['logits']['max_abs_logit_diff']:.2e} ({report['logits']['max_abs_logit_diff_rel']:.2e} rel); "
          f"KL {report['logits']['mean_kl']:.1e}; top-1 {report['logits']['top1_agreement']:.3f}; greedy ort "
          f"{greedy['exact_match_onnxruntime']}/{len(prompts)} genai {greedy['exact_match_genai']}/{len(prompts)}; "
          f"adapter moves {moved['max_dlogit_rel']:.2e} rel, KL {moved['mean_kl']:.2e}")


@pytest.mark.parametrize("family", FAMILIES)
def test_genai_config_has_the_familys_type_end_tokens_and_context(exported, family):
    fm, out, _ = exported(family)
    model = json.loads((out / spec.GENAI_CONFIG_FILE).read_text())["model"]
    config = json.loads((fm.base_dir / "config.json").read_text())
    genai_type, ends = EXPECTED[family]
    assert model["type"] == genai_type
    eos = model["eos_token_id"] if isinstance(model["eos_token_id"], list) else [model["eos_token_id"]]
    assert set(token_ids(out, ends)) <= set(eos)
    assert model["context_length"] == config["max_position_embeddings"] == model.get("context_length")
    assert model["vocab_size"] == config["vocab_size"]
    assert model["decoder"]["head_size"] == (64 if family == "qwen3" else 32)
    assert model["pad_token_id"] not in token_ids(out, (END_OF_TURN[family],))
    import onnxruntime_genai as og

    og.Model(og.Config(str(out)))  # genai 0.18 accepts the type and the config


def test_llama3_graph_has_scaled_rotary_caches_and_an_untied_head(exported):
    from qalora_export.formats.onnx.decoder import rotary_caches

    fm, out, _ = exported("llama3")
    config = json.loads((fm.base_dir / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "llama3" and not config["tie_word_embeddings"]
    cos = initializer(out, "cos_cache")
    assert cos.shape == (config["max_position_embeddings"], 16)
    np.testing.assert_array_equal(cos[:64], rotary_caches(config, 64)[0])
    unscaled = rotary_caches({**config, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}, 8192)[0]
    assert np.abs(unscaled - cos[:8192]).max() > 0.5
    nodes = {n.name: n for n in graph(out).graph.node}
    assert "/lm_head/TransposeTiedEmbedding" not in nodes
    assert list(nodes["/lm_head/MatMul"].input)[1] == "lm_head.weight_t"


def test_mistral_graph_windows_every_layer(exported):
    fm, out, _ = exported("mistral")
    window = json.loads((fm.base_dir / "config.json").read_text())["sliding_window"]
    gqa = [n for n in graph(out).graph.node if n.op_type == "GroupQueryAttention"]
    assert window == 4096 and [attribute(n, "local_window_size") for n in gqa] == [window] * len(gqa)


def test_qwen2_graph_keeps_the_qkv_biases(exported):
    from safetensors import safe_open

    fm, out, _ = exported("qwen2")
    nodes = {n.name: n for n in graph(out).graph.node}
    with safe_open(str(fm.base_dir / "model.safetensors"), "np") as f:
        for i in range(family_models.LAYERS):
            add = nodes[f"/model.layers.{i}.self_attn.qkv_proj/BiasAdd"]
            expected = np.concatenate([f.get_tensor(f"model.layers.{i}.self_attn.{m}_proj.bias") for m in "qkv"])
            np.testing.assert_array_equal(initializer(out, list(add.input)[1]), expected.astype(np.float32))
    assert "/lm_head/TransposeTiedEmbedding" in nodes


def test_qwen3_graph_norms_q_and_k_per_head(exported):
    fm, out, _ = exported("qwen3")
    nodes = {n.name: n for n in graph(out).graph.node}
    for i in range(family_models.LAYERS):
        for which in ("q", "k"):
            norm = nodes[f"/model.layers.{i}/self_attn/{which}_norm/SimplifiedLayerNormalization"]
            assert initializer(out, list(norm.input)[1]).shape == (64,)
        qkv = nodes[f"model.layers.{i}.self_attn.qkv_proj"]
        assert attribute(qkv, "N") == 4 * 64 + 2 * 2 * 64  # q 256 rows, k and v 128 each


# ----------------------------------------------------------------------------------- auto's other forms


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_stores_a_rank_1_fold_as_low_rank_correction(family_model, family, tmp_path):
    fm = family_model(family)
    adapter = family_models.make_family_adapter(family, fm.base_dir, tmp_path / "rank1", seed=3, rank=1, alpha=2.0)
    out = tmp_path / "onnx"
    summary = get_format("onnx").export(MergedView.open(fm.base_dir, adapter), out)
    assert summary["exact"] and summary["low_rank_layers"] == summary["quantized_layers"] == 7 * family_models.LAYERS
    weight_level(type(fm)(fm.name, fm.float_dir, fm.base_dir, adapter), out)
    prompts = chat_prompts(out)[1:]
    ref = reference_logits(fm.base_dir, adapter, prompts)
    stats = compare(ref, onnx_logits(out, prompts))
    assert stats["max_dlogit_rel"] <= spec.RUNTIME_MAX_DLOGIT_REL and stats["mean_kl"] <= spec.RUNTIME_MAX_KL
    assert stats["top1"] == 1.0
    moved = compare(ref, reference_logits(fm.base_dir, None, prompts))
    assert moved["max_dlogit_rel"] > 20 * spec.RUNTIME_MAX_DLOGIT_REL


@pytest.mark.parametrize("family", FAMILIES)
def test_integral_zero_shifts_export_as_uint8(family_model, family, tmp_path):
    fm = family_model(family)
    adapter = tiny_models.make_random_adapter(fm.base_dir, tmp_path / "integral", rank=8, alpha=16.0, seed=4,
                                              integral_shift=True)
    model = MergedView.open(fm.base_dir, adapter)
    auto = get_format("onnx").export(model, tmp_path / "auto")
    assert auto["zero_point_form"] == "uint8" and auto["exact"] and auto["split_layers"] == 0
    assert not any(t.name.endswith("zero_residual") for t in graph(tmp_path / "auto").graph.initializer)
    uint8 = get_format("onnx").export(MergedView.open(fm.base_dir, adapter), tmp_path / "uint8", zero_points="uint8")
    assert uint8["exact"] and uint8["zeros_moved"] == 0
    from qalora_export.formats.onnx.read import read_weights

    packed = dict(read_weights(tmp_path / "auto"))
    for name, weight in read_weights(tmp_path / "uint8"):
        assert torch.equal(weight, packed[name]), name
    prompts = chat_prompts(tmp_path / "uint8")[:1]
    ref = reference_logits(fm.base_dir, adapter, prompts)
    for out in ("auto", "uint8"):
        stats = compare(ref, onnx_logits(tmp_path / out, prompts))
        assert stats["max_dlogit_rel"] <= spec.RUNTIME_MAX_DLOGIT_REL and stats["top1"] == 1.0, out
    assert compare(ref, reference_logits(fm.base_dir, None, prompts))["max_dlogit_rel"] > 20 * spec.RUNTIME_MAX_DLOGIT_REL


# ----------------------------------------------------------------------------------- command line


def test_merge_to_onnx_and_verify_on_the_command_line(family_model, tmp_path):
    from qalora_export.cli import EXIT_OK, main

    fm = family_model("mistral")  # the smallest vocabulary: the runtime level in a child process
    out = tmp_path / "mistral-onnx"
    assert main(["merge", str(fm.base_dir), str(fm.adapter_dir), "--to", "onnx", "-o", str(out), "--no-verify"]) == EXIT_OK
    report = tmp_path / "verify.json"
    assert main(["verify", str(out), "--base", str(fm.base_dir), "--adapter", str(fm.adapter_dir),
                 "--report", str(report)]) == EXIT_OK
    data = json.loads(report.read_text())
    assert data["passed"] and data["format"] == "onnx" and data["runtime"]["passed"]
    assert data["runtime"]["greedy"]["genai_skipped"] == 0
