"""``MergedView`` (``qalora_export.checkpoint.merged_view``): a GPTQ base with an adapter folded in,
one layer at a time, on tiny random bases and adapters.

Each folded layer is the fold of the base layer (``fold_into_zero_points``) and dequantizes to
the unmerged ``W_hat + dW``, with ``dW`` recomputed here from the adapter's factors on disk for
every pooling convention and for an act-order base; without an adapter the base comes back
unchanged; the non-quantized tensors, shapes and properties are the base's; an adapter of another
base is refused (immediately, or by the deferred check); nothing on disk is modified.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import tiny_models
import torch
from safetensors.torch import load_file

from qalora_export.checkpoint.adapter_files import (
    ADAPTER_WEIGHTS,
    PEFT_PREFIX,
    load_adapter,
)
from qalora_export.checkpoint.gptq import GPTQCheckpoint
from qalora_export.checkpoint.merged_view import MergedView
from qalora_export.core.adapter import AdapterLayer, QALoRAAdapter
from qalora_export.core.fold import FoldStats, fold_into_zero_points
from qalora_export.errors import AdapterError, FoldError
from qalora_export.formats import get_format

RANK, ALPHA, GROUP = 4, 8.0, 32
# hidden 64, intermediate 128, 4 heads of 16, 2 kv heads: (out, in) of each projection
SHAPES = {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64),
          "gate_proj": (128, 64), "up_proj": (128, 64), "down_proj": (64, 128)}
QUANT_SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx")
# (base, pooling, pool_groups) of each adapter in the fixture
CASES = [("plain", "peft", "quantization"), ("plain", "mean", "quantization"), ("plain", "sum", "quantization"),
         ("plain", "peft", "consecutive"), ("act", "peft", "quantization"), ("act", "mean", "quantization"),
         ("act", "sum", "quantization")]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("merged_view")
    w = {"root": root,
         "plain": tiny_models.make_tiny_base(root / "plain", bits=4, group_size=GROUP),
         "act": tiny_models.make_tiny_base(root / "act", bits=4, group_size=GROUP, act_order=True),
         "other": tiny_models.make_tiny_base(root / "other", bits=4, group_size=GROUP, seed=1)}
    for i, (base, pooling, groups) in enumerate(CASES):
        w[(base, pooling, groups)] = tiny_models.make_random_adapter(
            w[base], root / f"adapter-{base}-{pooling}-{groups}", rank=RANK, alpha=ALPHA, seed=10 + i,
            pooling=pooling, pool_groups=groups, magnitude=0.1)
    w["act-consecutive"] = tiny_models.make_random_adapter(w["act"], root / "adapter-act-consecutive", rank=RANK,
                                                           alpha=ALPHA, seed=3, pool_groups="consecutive")
    return w


def _expected_delta(adapter_dir: Path, name: str, pooling: str, pool_groups: str, g_idx: torch.Tensor,
                    in_features: int) -> torch.Tensor:
    """``dW`` [out, in] in float64 from the factors in the adapter file, by the pooling conventions:
    ``s * k * (B @ A)[:, a(i)]`` with ``k`` = 1/p (mean), 1 (sum), (in/p)/p (peft)."""
    tensors = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    a = tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"].to(torch.float64)  # [r, L]
    b = tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"].to(torch.float64)  # [out, r]
    p = in_features // a.shape[1]
    k = {"mean": 1.0 / p, "sum": 1.0, "peft": (in_features / p) / p}[pooling]
    column_pool = g_idx.to(torch.int64) if pool_groups == "quantization" else torch.arange(in_features) // p
    return (ALPHA / RANK) * k * (b @ a)[:, column_pool]


def _tree_hash(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------ fold and reference


@pytest.mark.parametrize("base_kind, pooling, pool_groups", CASES)
def test_read_layer_is_the_fold_and_equals_unmerged_weight(world, base_kind, pooling, pool_groups):
    base_dir, adapter_dir = world[base_kind], world[(base_kind, pooling, pool_groups)]
    view = MergedView.open(base_dir, adapter_dir)
    assert view.adapter is not None and view.adapter.pooling == pooling
    ckpt = GPTQCheckpoint(base_dir)
    adapter = load_adapter(adapter_dir)
    assert [layer.name for layer, _ in view.iter_layers()] == view.quantized_modules == ckpt.quantized_modules
    for name in view.quantized_modules:
        base_layer = ckpt.read_layer(name)
        assert base_layer.is_act_order is (base_kind == "act")
        folded, stats = view.read_layer(name)
        expected, expected_stats = fold_into_zero_points(base_layer, adapter)
        assert folded.name == name and folded.zeros.dtype == torch.float64
        for field in ("codes", "scales", "g_idx", "zeros"):
            assert torch.equal(getattr(folded, field), getattr(expected, field)), (name, field)
        assert stats == expected_stats
        # the fold moved the zeros (fractionally) and nothing else
        assert torch.equal(folded.codes, base_layer.codes) and torch.equal(folded.scales, base_layer.scales)
        assert not torch.equal(folded.zeros, base_layer.zeros.to(torch.float64))
        assert stats.max_abs_shift > 0 and stats.integral is False
        # codes are never needed for the zeros
        lean, lean_stats = view.read_layer(name, with_codes=False)
        assert torch.equal(lean.zeros, folded.zeros) and lean_stats == stats

        w_hat = base_layer.dequantize(torch.float64)
        delta = _expected_delta(adapter_dir, name, pooling, pool_groups, base_layer.g_idx, base_layer.in_features)
        assert float(delta.abs().max()) > 1e-3 * float(w_hat.abs().max())  # a real delta, not round-off
        reference = view.reference_weight(name)
        atol = 1e-12 * float(w_hat.abs().max())
        torch.testing.assert_close(reference, w_hat + delta, rtol=0, atol=atol)
        rows_of = view.reference_weight_rows(name)
        n = reference.shape[0]
        for start, stop in ((0, 1), (1, n // 3), (n // 3, n)):
            assert torch.equal(rows_of(slice(start, stop)), reference[start:stop])
        torch.testing.assert_close(folded.dequantize(torch.float64), reference, rtol=0, atol=atol)


def test_consecutive_pooling_on_act_order_base_is_refused(world):
    view = MergedView.open(world["act"], world["act-consecutive"])
    name = view.quantized_modules[0]
    with pytest.raises(FoldError, match="act-order"):
        view.read_layer(name)


def test_without_adapter_the_base_comes_back_unchanged(world):
    view = MergedView.open(world["act"])
    ckpt = GPTQCheckpoint(world["act"])
    assert view.adapter is None
    for name in view.quantized_modules:
        base_layer = ckpt.read_layer(name)
        layer, stats = view.read_layer(name)
        for field in ("codes", "scales", "g_idx", "zeros"):
            assert torch.equal(getattr(layer, field), getattr(base_layer, field)), (name, field)
        assert stats == FoldStats(name, 0.0, True)
        assert torch.equal(view.reference_weight(name), base_layer.dequantize(torch.float64))


# ------------------------------------------------------------------------------- the base's tensors


def test_other_tensors_shapes_and_properties(world):
    view = MergedView.open(world["plain"], world[("plain", "peft", "quantization")])
    assert (view.bits, view.group_size) == (4, GROUP)
    assert view.tokenizer_dir == world["plain"]
    assert "quantization_config" not in view.model_config
    assert view.model_config["hidden_size"] == 64 and view.model_config["model_type"] == "llama"

    stored = load_file(str(world["plain"] / "model.safetensors"))
    quantized = {f"{m}{s}" for m in view.quantized_modules for s in QUANT_SUFFIXES} & set(stored)
    others = view.other_tensor_names()
    assert others == sorted(set(stored) - quantized)
    assert not any(name.endswith(QUANT_SUFFIXES) for name in others)
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= set(others)
    assert len(others) == 3 + 2 * 2  # embeddings, head, final norm, two norms per layer
    for name in others:
        assert torch.equal(view.read_tensor(name), stored[name]), name
    embed = view.read_tensor("model.embed_tokens.weight", slice(5, 9))
    assert torch.equal(embed, stored["model.embed_tokens.weight"][5:9])

    assert len(view.quantized_modules) == 2 * len(SHAPES)
    for name in view.quantized_modules:
        assert view.layer_shape(name) == SHAPES[name.rsplit(".", 1)[1]], name
        assert view.layer_shape(name) == tuple(view.reference_weight(name).shape)


# ---------------------------------------------------------------------------------- another base


def test_adapter_of_another_base_is_refused(world):
    adapter_dir = world[("plain", "peft", "quantization")]
    with pytest.raises(AdapterError, match="different quantized base") as exc:
        MergedView.open(world["other"], adapter_dir)
    assert GPTQCheckpoint(world["plain"]).fingerprint() in str(exc.value)  # recorded
    assert GPTQCheckpoint(world["other"]).fingerprint() in str(exc.value)  # actual
    with pytest.raises(AdapterError, match="fingerprint"):  # also an act-order base of the same shapes
        MergedView.open(world["act"], adapter_dir)
    # the right base opens
    assert MergedView.open(world["plain"], adapter_dir).adapter.base_fingerprint == \
        GPTQCheckpoint(world["plain"]).fingerprint()


def test_deferred_fingerprint_check_raises_after_the_body(world):
    view = MergedView.open(world["other"], world[("plain", "peft", "quantization")], defer_fingerprint=True)
    ran = []
    with pytest.raises(AdapterError, match="different quantized base"):
        with view.fingerprint_checked():
            ran.append(view.read_layer(view.quantized_modules[0])[1].name)
    assert ran == [view.quantized_modules[0]]  # the body ran; the mismatch is raised at the end
    with view.fingerprint_checked():  # the check is used up: a second block only runs its body
        ran.append("again")
    assert ran[-1] == "again"


def test_deferred_mismatch_is_reported_over_the_body_error(world):
    view = MergedView.open(world["other"], world[("plain", "peft", "quantization")], defer_fingerprint=True)
    body_error = RuntimeError("the fold failed first")
    with pytest.raises(AdapterError, match="different quantized base") as exc:
        with view.fingerprint_checked():
            raise body_error
    assert exc.value.__cause__ is body_error


def test_deferred_check_on_the_right_base_passes(world):
    view = MergedView.open(world["plain"], world[("plain", "mean", "quantization")], defer_fingerprint=True)
    with view.fingerprint_checked():
        layer, stats = view.read_layer(view.quantized_modules[-1])
    assert stats.max_abs_shift > 0
    with pytest.raises(KeyError):  # a body error on the right base is the body's own
        with MergedView.open(world["plain"], world[("plain", "mean", "quantization")],
                             defer_fingerprint=True).fingerprint_checked():
            raise KeyError("body")


def test_fingerprint_versions_and_unknown_modules(world):
    ckpt = GPTQCheckpoint(world["plain"])
    layers = dict(load_adapter(world[("plain", "sum", "quantization")]).layers)

    def adapter(fingerprint, extra_layers=None):
        return QALoRAAdapter(layers={**layers, **(extra_layers or {})}, rank=RANK, alpha=ALPHA, pooling="sum",
                             pool_group_size=GROUP, pool_groups="quantization", base_fingerprint=fingerprint)

    MergedView(ckpt, adapter(ckpt.fingerprint(1)))  # an older adapter's v1 record still matches
    with pytest.raises(AdapterError, match="fingerprint"):
        MergedView(GPTQCheckpoint(world["other"]), adapter(ckpt.fingerprint(1)))
    MergedView(GPTQCheckpoint(world["other"]), adapter(ckpt.fingerprint()), check_fingerprint=False)  # opted out
    MergedView(GPTQCheckpoint(world["other"]), adapter(None))  # nothing recorded: nothing to check
    stray = {"model.layers.7.mlp.up_proj": AdapterLayer(torch.randn(RANK, 2), torch.randn(128, RANK))}
    with pytest.raises(AdapterError, match="does not quantize"):
        MergedView(ckpt, adapter(ckpt.fingerprint(), stray))


# --------------------------------------------------------------------------------- inputs intact


def test_inputs_are_not_modified(world, tmp_path):
    base_dir, adapter_dir = world["act"], world[("act", "peft", "quantization")]
    before = (_tree_hash(base_dir), _tree_hash(adapter_dir))
    fresh = MergedView.open(base_dir, adapter_dir)
    references = {name: fresh.reference_weight(name) for name in fresh.quantized_modules}

    view = MergedView.open(base_dir, adapter_dir, defer_fingerprint=True)
    with view.fingerprint_checked():
        for name in view.quantized_modules:
            base_zeros = view.base.read_layer(name).zeros.clone()
            folded, _ = view.read_layer(name)
            # the fold left the base record (kept for the next call) alone: the reference is unchanged
            assert torch.equal(view.reference_weight(name), references[name]), name
            assert torch.equal(view.base.read_layer(name).zeros, base_zeros)
            assert not torch.equal(folded.zeros, base_zeros.to(torch.float64))
        for name in view.other_tensor_names():
            view.read_tensor(name)
    get_format("gptq").export(MergedView.open(base_dir, adapter_dir), tmp_path / "merged")
    assert (_tree_hash(base_dir), _tree_hash(adapter_dir)) == before
