"""MLX artifacts of tiny random models, verified in mlx-lm on the CPU (weight level and runtime level),
read back, and refused where MLX cannot hold the base.

Each tiny base (RTN, random weights) gets a random adapter large enough that the folded model's logits
move far beyond the runtime tolerance, so a layout bug or a missing fold cannot pass.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tiny_models
import torch

from qalora_export.checkpoint.merged_view import MergedView
from qalora_export.errors import FormatLimitError
from qalora_export.formats import detect_format, get_format
from qalora_export.formats.mlx import read, spec
from qalora_export.verify import verify_artifact

pytest.importorskip("mlx_lm")

MLX = get_format("mlx")
# (bits, group size): every code width the project quantizes to, both group sizes
CASES = [(bits, gs) for bits in (2, 3, 4, 8) for gs in (32, 64)]


@pytest.fixture(scope="session")
def mlx_bases(tmp_path_factory):
    """``(bits, group size) -> (base, adapter)`` built once a session."""
    root = tmp_path_factory.mktemp("mlx-bases")
    cache = {}

    def get(bits: int, gs: int, **kwargs) -> tuple[Path, Path]:
        key = (bits, gs, tuple(sorted(kwargs.items())))
        if key not in cache:
            name = f"w{bits}g{gs}" + "".join(f"-{k}{v}" for k, v in sorted(kwargs.items()))
            base = tiny_models.make_tiny_base(root / name, bits=bits, group_size=gs, **kwargs)
            adapter = tiny_models.make_random_adapter(base, root / f"{name}-adapter", magnitude=0.3, seed=bits)
            cache[key] = (base, adapter)
        return cache[key]
    return get


@pytest.mark.parametrize("bits,gs", CASES, ids=[f"w{b}g{g}" for b, g in CASES])
def test_export_verifies_in_mlx_lm(bits, gs, mlx_bases, tmp_path):
    base, adapter = mlx_bases(bits, gs)
    out = tmp_path / "mlx"
    summary = MLX.export(MergedView.open(base, adapter), out)
    assert summary["exact"] and summary["bits"] == bits and summary["group_size"] == gs
    assert summary["max_fold_shift"] > 0.3  # the adapter moves zero-points by a good part of a code unit
    assert detect_format(out) is MLX
    report = verify_artifact(out, base, adapter)
    weights, runtime = report["weights"], report["runtime"]
    assert weights["passed"] and weights["layers_checked"] == len(MergedView.open(base).quantized_modules)
    assert weights["max_rel_vs_unmerged"] <= spec.WEIGHT_TOLERANCE
    assert runtime["passed"], runtime
    assert runtime["artifact"]["greedy_exact_match"] == len(runtime["reference_greedy"])
    assert runtime["artifact"]["max_abs_logit_diff_rel"] <= spec.RUNTIME_MAX_DLOGIT_REL
    assert report["passed"]


def test_the_adapter_moves_logits_far_beyond_the_tolerance(mlx_bases, tmp_path):
    """The fold is what verify sees: the base alone, exported the same way, fails the artifact's check."""
    from qalora_export.formats.mlx.runtime import run_logits_and_greedy
    from qalora_export.runtimes.compare import compare_logits

    base, adapter = mlx_bases(4, 32)
    MLX.export(MergedView.open(base, adapter), tmp_path / "merged")
    MLX.export(MergedView.open(base), tmp_path / "base")
    prompts = [[1, 5, 9, 17, 33, 65, 100, 2], [1, 40, 41, 42]]
    merged, _ = run_logits_and_greedy(tmp_path / "merged", prompts, 2)
    plain, _ = run_logits_and_greedy(tmp_path / "base", prompts, 2)
    assert compare_logits(merged, plain).mean_kl > 100 * spec.RUNTIME_MAX_KL


def test_round_trip_codes_and_weights_and_sharding(mlx_bases, tmp_path):
    base, adapter = mlx_bases(3, 32)
    model = MergedView.open(base, adapter)
    MLX.export(model, tmp_path / "one")
    summary = MLX.export(MergedView.open(base, adapter), tmp_path / "sharded", max_shard_bytes=20_000)
    assert len(summary["files"]) > 1 and (tmp_path / "sharded" / spec.INDEX_FILE).is_file()
    one, sharded = dict(read.read_weights(tmp_path / "one")), dict(read.read_weights(tmp_path / "sharded"))
    assert sorted(one) == sorted(sharded) == sorted(model.quantized_modules)
    for name in model.quantized_modules:
        folded = model.read_layer(name)[0]
        torch.testing.assert_close(one[name], sharded[name], rtol=0, atol=0)
        exact = folded.dequantize(torch.float64)
        assert (one[name] - exact).abs().max() <= spec.WEIGHT_TOLERANCE * exact.abs().max()
    # the packed codes are the base's codes, unchanged by the fold
    from safetensors import safe_open

    name = model.quantized_modules[0]
    with safe_open(str(tmp_path / "one" / spec.SINGLE_WEIGHTS_FILE), framework="pt") as f:
        words = f.get_tensor(f"{name}.weight")
    assert words.dtype == torch.uint32
    codes = spec.unpack_words(words.view(torch.int32).numpy().view(np.uint32), 3, model.layer_shape(name)[1])
    np.testing.assert_array_equal(codes, model.base.read_layer(name).codes.numpy())
    # deterministic bytes; inputs untouched
    again = MLX.export(MergedView.open(base, adapter), tmp_path / "again")
    assert again["bytes"] == summary["bytes"]
    for file in ("config.json", spec.SINGLE_WEIGHTS_FILE):
        assert (tmp_path / "one" / file).read_bytes() == (tmp_path / "again" / file).read_bytes()
    info = MLX.inspect(tmp_path / "sharded")
    assert info["kind"] == "mlx" and info["quantization"]["bits"] == 3 and len(info["files"]) == len(summary["files"])


def test_mlx_lm_load_reads_the_artifact_with_its_tokenizer(mlx_bases, tmp_path):
    import mlx.core as mx
    from mlx_lm import load

    base, adapter = mlx_bases(4, 32)
    MLX.export(MergedView.open(base, adapter), tmp_path / "mlx")
    model, tokenizer = load(str(tmp_path / "mlx"))
    assert tokenizer.eos_token_id == 2
    assert model(mx.array([[1, 2, 3]])).shape == (1, 3, tiny_models.TINY_VOCAB)


def test_rope_theta_nested_under_rope_parameters_runs_with_the_right_theta(mlx_bases, tmp_path):
    """transformers 5 nests rope_theta; without a top-level one mlx-lm silently uses 10000."""
    from qalora_export.formats.mlx.runtime import run_logits_and_greedy

    base, adapter = mlx_bases(4, 32)
    theta_base = tmp_path / "base-theta"
    shutil.copytree(base, theta_base)
    config = json.loads((theta_base / "config.json").read_text())
    config["rope_parameters"] = {"rope_theta": 100000.0, "rope_type": "default"}
    assert "rope_theta" not in config
    (theta_base / "config.json").write_text(json.dumps(config))
    model = MergedView(MergedView.open(theta_base).base, MergedView.open(base, adapter).adapter, check_fingerprint=False)
    out = tmp_path / "mlx"
    MLX.export(model, out)
    written = json.loads((out / "config.json").read_text())
    assert written["rope_theta"] == 100000.0
    result = MLX.verify_runtime(model, out, [[1, 5, 9, 17, 33, 65, 100, 70, 71, 72, 73, 74]], tmp_path / "w", "cpu")
    assert result["passed"], result
    # the regression: the same artifact without the top-level key runs another model in mlx-lm
    del written["rope_theta"]
    (out / "config.json").write_text(json.dumps(written))
    wrong = MLX.verify_runtime(model, out, [[1, 5, 9, 17, 33, 65, 100, 70, 71, 72, 73, 74]], tmp_path / "w", "cpu")
    assert not wrong["passed"] and not wrong["artifact"]["checks"]["max_dlogit_rel"]
    assert run_logits_and_greedy(out, [[1, 2]], 0)[0][0].shape == (2, tiny_models.TINY_VOCAB)


def test_float16_export_records_rounding_and_verifies_against_its_floor(mlx_bases, tmp_path):
    base, adapter = mlx_bases(4, 32)
    out = tmp_path / "mlx16"
    summary = MLX.export(MergedView.open(base, adapter), out, dtype="float16")
    assert summary["exact"] is False and summary["max_bias_rounding"] > 0 and summary["max_scale_rounding"] == 0
    meta = MLX.merge_metadata(out)
    assert meta["dtype"] == "float16" and meta["exact"] is False and meta["max_bias_rounding"] > 0
    model = MergedView.open(base, adapter)
    name = model.quantized_modules[0]
    declared = MLX.declared_layer(model, name, meta).dequantize(torch.float64)
    exact = model.read_layer(name)[0].dequantize(torch.float64)
    assert (declared - exact).abs().max() > 1e-6 * exact.abs().max()  # the rounding is declared, not hidden
    report = verify_artifact(out, base, adapter)
    assert report["weights"]["passed"] and report["runtime"]["passed"], report["runtime"]
    assert "floor" in report["runtime"] and report["runtime"]["dtype"] == "float16"


def test_unknown_dtype_is_refused(mlx_bases, tmp_path):
    from qalora_export.errors import ConfigError

    base, adapter = mlx_bases(4, 32)
    with pytest.raises(ConfigError, match="--mlx-dtype 'int8'"):
        MLX.export(MergedView.open(base, adapter), tmp_path / "x", dtype="int8")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("kind", ["act_order", "group16", "per_row"])
def test_bases_mlx_cannot_hold_are_refused_before_writing(kind, mlx_bases, tmp_path):
    if kind == "act_order":
        base, adapter = mlx_bases(4, 32, act_order=True)
        match = "no g_idx: the input columns of a Linear cannot be permuted"
    elif kind == "group16":
        base, adapter = mlx_bases(4, 16)
        match = "group size 16 columns cannot be held by MLX"
    else:  # per-row groups (group size -1) of 256 inputs, wider than MLX's largest group
        base, adapter = mlx_bases(4, 256, hidden=256, intermediate=256)
        per_row = tmp_path / "per-row-base"
        shutil.copytree(base, per_row)
        config = json.loads((per_row / "config.json").read_text())
        config["quantization_config"]["group_size"] = -1  # the same tensors: one group per row
        (per_row / "config.json").write_text(json.dumps(config))
        (per_row / "quantize_config.json").write_text(json.dumps(config["quantization_config"]))
        base = per_row
        adapter = None
        match = "per-row groups"
    with pytest.raises(FormatLimitError, match=match):
        MLX.export(MergedView.open(base, adapter), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_trivial_g_idx_is_accepted(mlx_bases, tmp_path):
    base, adapter = mlx_bases(4, 32)
    model = MergedView.open(base, adapter)
    assert any(k.endswith(".g_idx") for k in model.base.tensor_files)  # stored, equal to i // group_size
    MLX.export(model, tmp_path / "out")
    assert (tmp_path / "out" / spec.SINGLE_WEIGHTS_FILE).is_file()


def test_damaged_artifacts_are_typed_errors(mlx_bases, tmp_path):
    from qalora_export.errors import CheckpointError

    base, adapter = mlx_bases(4, 32)
    good = tmp_path / "good"
    MLX.export(MergedView.open(base, adapter), good)

    def damaged(name: str, change) -> Path:
        path = tmp_path / name
        shutil.copytree(good, path)
        change(path)
        return path

    no_quant = damaged("no-quant", lambda p: (p / "config.json").write_text('{"model_type": "llama"}'))
    with pytest.raises(CheckpointError, match='has no "quantization" block'):
        list(read.read_weights(no_quant))
    bad_json = damaged("bad-json", lambda p: (p / "config.json").write_text("{"))
    with pytest.raises(CheckpointError, match="cannot be read as JSON"):
        read.merge_metadata(bad_json)
    no_weights = damaged("no-weights", lambda p: (p / spec.SINGLE_WEIGHTS_FILE).unlink())
    with pytest.raises(CheckpointError, match="has neither"):
        list(read.read_weights(no_weights))
    bad_index = damaged("bad-index", lambda p: (p / spec.INDEX_FILE).write_text("[]"))
    with pytest.raises(CheckpointError, match="is not a safetensors index"):
        list(read.read_weights(bad_index))

    def rewrite(path: Path, edit) -> None:
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(path / spec.SINGLE_WEIGHTS_FILE))
        edit(tensors)
        save_file(tensors, str(path / spec.SINGLE_WEIGHTS_FILE), metadata=spec.SHARD_METADATA)

    name = MergedView.open(base).quantized_modules[0]
    missing = damaged("missing", lambda p: rewrite(p, lambda t: t.pop(f"{name}.biases")))
    with pytest.raises(CheckpointError, match=f"the tensors of {name} are inconsistent or missing"):
        list(read.read_weights(missing))
    nan = damaged("nan", lambda p: rewrite(p, lambda t: t[f"{name}.scales"].fill_(float("nan"))))
    with pytest.raises(CheckpointError, match="decodes to NaN or inf"):
        list(read.read_weights(nan))


def test_runtime_refuses_bad_prompts_and_directories(mlx_bases, tmp_path):
    from qalora_export.errors import ConfigError
    from qalora_export.formats.mlx import runtime

    base, adapter = mlx_bases(4, 32)
    out = tmp_path / "mlx"
    MLX.export(MergedView.open(base, adapter), out)
    with pytest.raises(ConfigError, match="empty prompt"):
        runtime._logits_and_greedy_here(str(out), [[]], 1)
    with pytest.raises(ConfigError, match="outside the model's vocabulary of 128"):
        runtime._logits_and_greedy_here(str(out), [[1, 999]], 1)
    with pytest.raises(ConfigError, match="is not an MLX model directory"):
        runtime.load_mlx_model(tmp_path)
    with pytest.raises(ConfigError, match="verify needs at least one non-empty prompt"):
        MLX.verify_runtime(MergedView.open(base, adapter), out, [], tmp_path / "w", "cpu")


def test_float16_overflow_of_a_folded_bias_is_refused(mlx_bases):
    from qalora_export.formats.mlx.encode import encode_scales_biases

    base, adapter = mlx_bases(4, 32)
    layer = MergedView.open(base, adapter).read_layer(MergedView.open(base).quantized_modules[0])[0]
    far = layer.with_zeros(layer.zeros + 1e9)  # a shift fp16 cannot hold (|bias| > 65504)
    with pytest.raises(FormatLimitError, match="cannot be stored as float16.*--mlx-dtype float32"):
        encode_scales_biases(far, "float16")
    encode_scales_biases(far, "float32")  # float32 holds it
