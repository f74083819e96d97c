"""End to end on the real model: SmolLM2-135M-Instruct (RTN 4-bit g32) + a random QA-LoRA adapter,
exported to Q4_1 GGUF, checked against the fixture GGUF's metadata, decoded, and run in llama.cpp."""

from __future__ import annotations

import pytest

import tiny_models
from qalora_export.formats.gguf import FORMAT as G
from qalora_export.formats.gguf import verify as gguf_verify
from qalora_export.checkpoint.merged_view import MergedView

pytestmark = pytest.mark.slow

# Fixed token ids (SmolLM2 vocabulary): a ChatML user turn and plain English text.
PROMPTS = [
    [1, 4093, 198, 19556, 253, 2, 198, 1, 520, 9531, 198],
    [504, 3575, 282, 4649, 314, 3459, 30, 378, 3575, 282, 10327, 314],
]


@pytest.fixture(scope="module")
def smollm2_merged(smollm2_base, tmp_path_factory) -> MergedView:
    adapter = tiny_models.make_random_adapter(smollm2_base, tmp_path_factory.mktemp("smol-ad") / "adapter",
                                              rank=8, alpha=16, magnitude=0.02)
    return MergedView.open(smollm2_base, adapter)


def test_smollm2_export_weights_metadata_and_runtime(smollm2_merged, smollm2_gguf, tmp_path):
    from gguf import GGUFReader

    out = tmp_path / "smollm2-qalora.Q4_1.gguf"
    summary = G.export(smollm2_merged, out)
    assert summary["quantized_tensors"] == 30 * 7
    assert summary["tokenizer"]["tokens"] == 49152
    assert summary["bytes"] < 0.35 * 4 * 135e6  # Q4_1 projections + f16 embedding

    # hyperparameters, special tokens and chat template as in the llama.cpp file we started from
    ours = {k: f.contents() for k, f in GGUFReader(str(out)).fields.items()}
    theirs = {k: f.contents() for k, f in GGUFReader(str(smollm2_gguf)).fields.items()}
    for key in ("llama.block_count", "llama.context_length", "llama.embedding_length", "llama.feed_forward_length",
                "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.freq_base",
                "llama.attention.layer_norm_rms_epsilon", "llama.vocab_size", "llama.rope.dimension_count",
                "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.chat_template"):
        assert ours[key] == pytest.approx(theirs[key]) if isinstance(theirs[key], float) else ours[key] == theirs[key], key

    # weight level on the first, a middle and the last block (test_gguf.py checks every layer of tiny models)
    worst, checked = 0.0, 0
    for name, w in G.read_weights(out):
        if name.split(".")[2] in ("0", "15", "29"):
            ref = smollm2_merged.reference_weight(name)
            worst = max(worst, float((w - ref).abs().max()) / float(ref.abs().max()))
            checked += 1
    assert checked == 21 and worst <= G.weight_tolerance

    result = gguf_verify.verify_runtime(smollm2_merged, out, PROMPTS, tmp_path / "verify", n_new=4)
    print({k: {m: result[k][m] for m in ("mean_kl", "max_kl", "top1_agreement", "max_abs_logit_diff", "greedy_match")}
           for k in ("artifact", "floor", "f32_reference")})
    assert result["passed"], {k: result[k] for k in ("rule", "allowed_mean_kl", "kl_over_floor")}
    assert result["f32_reference"]["mean_kl"] < 1e-4
    assert result["artifact"]["top1_agreement"] >= 0.8
