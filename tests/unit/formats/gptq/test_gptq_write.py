"""Tests of qalora_export.formats.gptq.write (``merge --to gptq``) and encode.integer_zeros.

A tiny random LLaMA quantized by RTN (4-bit, group 32) is merged with (a) an adapter whose fold moves
every zero-point by a whole number of code units (exact: the written layers are the fold, bit for
bit), (b) a random adapter (fractional zeros, rounded to nearest and reported, or refused with
``require_exact``), (c) an adapter that folds some zeros to exactly 0, which the v1 ``gptq`` format
(stores zero - 1) cannot hold. Also: sharding and its index, the planned tensors against the written
safetensors headers, the files copied from the base, output refusal and inputs left untouched.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import tiny_models
import torch

from qalora_export.checkpoint.adapter_files import save_adapter
from qalora_export.checkpoint.gptq import GPTQCheckpoint
from qalora_export.checkpoint.gptq_config import INDEX_FILE, zero_range
from qalora_export.checkpoint.merged_view import MergedView
from qalora_export.core.adapter import AdapterLayer, QALoRAAdapter, pooling_factor
from qalora_export.core.record import QuantizedLinear, contiguous_g_idx
from qalora_export.errors import FoldError, FormatLimitError, OutputExistsError
from qalora_export.formats import get_format
from qalora_export.formats.gptq.encode import ZeroPolicyResult, integer_zeros
from qalora_export.formats.gptq.spec import META_KEY, OUTPUT_DTYPES
from qalora_export.formats.gptq.write import (
    copy_tokenizer_files,
    export,
    planned_tensors,
)

BITS, GROUP = 4, 32
RANK, ALPHA = 4, 8.0  # rank >= groups of every layer (in 64 or 128: 2 or 4 groups)
SAFETENSORS_DTYPES = {"I32": torch.int32, "F16": torch.float16, "F32": torch.float32, "BF16": torch.bfloat16,
                      "I64": torch.int64, "U8": torch.uint8}
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"}


def dir_digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def safetensors_header(path: Path) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def written_specs(out: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    specs = {}
    for shard in sorted(out.glob("*.safetensors")):
        for name, entry in safetensors_header(shard).items():
            assert name not in specs, f"{name} written twice"
            specs[name] = (SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"]))
    return specs


def zero_hitting_adapter(base: Path, out: Path, seed: int = 0, fraction: float = 0.1) -> tuple[Path, dict]:
    """An adapter whose fold moves a random ``fraction`` of every layer's zero-points to exactly 0
    (shift = zero, built as ``tiny_models.make_random_adapter(integral_shift=True)`` builds its
    factors; every factor here is a power of two or an fp16 value, so the fold is exact) and leaves
    the others where they are. Returns the directory and each layer's boolean mask ``[G, out]``."""
    ckpt = GPTQCheckpoint(base)
    gen = torch.Generator().manual_seed(seed)
    s = ALPHA / RANK
    layers, masks = {}, {}
    for name in ckpt.quantized_modules:
        rec = ckpt.read_layer(name)
        G, n_out = rec.num_groups, rec.out_features
        k = pooling_factor("peft", rec.in_features, rec.in_features // G)
        mask = torch.rand(G, n_out, generator=gen) < fraction
        shift = torch.where(mask, rec.zeros.to(torch.float64), 0.0)
        a = torch.eye(RANK, G, dtype=torch.float64)
        b = torch.zeros(n_out, RANK, dtype=torch.float64)
        b[:, :G] = (shift * rec.scales.to(torch.float64)).T / (s * k)
        layers[name] = AdapterLayer(lora_A=a.to(torch.float32), lora_B=b.to(torch.float32))
        masks[name] = mask
    adapter = QALoRAAdapter(layers=layers, rank=RANK, alpha=ALPHA, pooling="peft", pool_group_size=GROUP,
                            pool_groups="quantization", base_fingerprint=ckpt.fingerprint())
    save_adapter(adapter, out, base_model_path=str(base))
    return out, masks


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gptq-write")


@pytest.fixture(scope="module")
def base(root) -> Path:
    return tiny_models.make_tiny_base(root / "base-v2", bits=BITS, group_size=GROUP)


@pytest.fixture(scope="module")
def base_v1(root) -> Path:
    return tiny_models.make_tiny_base(root / "base-v1", bits=BITS, group_size=GROUP, checkpoint_format="gptq", seed=3)


@pytest.fixture(scope="module")
def integral_adapter(base, root) -> Path:
    return tiny_models.make_random_adapter(base, root / "ad-integral", rank=RANK, alpha=ALPHA, seed=1,
                                           integral_shift=True)


@pytest.fixture(scope="module")
def random_adapter(base, root) -> Path:
    return tiny_models.make_random_adapter(base, root / "ad-random", rank=RANK, alpha=ALPHA, seed=2, magnitude=0.3)


@pytest.fixture(scope="module")
def zero_adapter(base_v1, root) -> tuple[Path, dict]:
    return zero_hitting_adapter(base_v1, root / "ad-zero", seed=4)


@pytest.fixture(scope="module", autouse=True)
def inputs_digest(base, base_v1, integral_adapter, random_adapter, zero_adapter) -> dict:
    return {str(d): dir_digest(d) for d in (base, base_v1, integral_adapter, random_adapter, zero_adapter[0])}


def assert_same_layer(written: QuantizedLinear, expected: QuantizedLinear) -> None:
    assert written.bits == expected.bits and written.group_size == expected.group_size
    assert torch.equal(written.codes, expected.codes)
    assert written.scales.dtype == expected.scales.dtype and torch.equal(written.scales, expected.scales)
    assert written.zeros.dtype == expected.zeros.dtype == torch.float64
    assert torch.equal(written.zeros, expected.zeros)
    assert torch.equal(written.g_idx, expected.g_idx)
    assert (written.bias is None) == (expected.bias is None)


# ----------------------------------------------------------------------------------- exact and rounded


def test_integral_adapter_exports_exactly(base, integral_adapter, tmp_path):
    model = MergedView.open(base, integral_adapter)
    out = tmp_path / "out"
    summary = get_format("gptq").export(model, out)
    ckpt, merged = GPTQCheckpoint(base), GPTQCheckpoint(out)
    assert summary["format"] == "gptq" and summary["path"] == str(out)
    assert summary["checkpoint_format"] == "gptq_v2" and summary["bits"] == BITS and summary["group_size"] == GROUP
    assert summary["layers"] == len(ckpt.quantized_modules) == 2 * 7
    assert summary["exact"] is True
    assert summary["zeros_moved"] == 0 and summary["zeros_clamped"] == 0 and summary["max_zero_change"] == 0.0
    assert summary["max_fold_shift"] == 1.0  # shifts of -1, 0, +1 code units
    assert summary["zeros_total"] == sum(ckpt.read_layer(n).zeros.numel() for n in ckpt.quantized_modules)
    assert list(summary["per_layer"]) == ckpt.quantized_modules
    json.dumps(summary)

    assert merged.quantized_modules == ckpt.quantized_modules
    moved = 0
    for name in ckpt.quantized_modules:
        folded, stats = model.read_layer(name)
        assert stats.integral
        written = merged.read_layer(name)
        assert_same_layer(written, folded)
        moved += int((written.zeros != ckpt.read_layer(name).zeros).sum())
        assert torch.equal(written.dequantize(torch.float64), folded.dequantize(torch.float64))
        ref = model.reference_weight(name)
        assert float((written.dequantize(torch.float64) - ref).abs().max()) <= 1e-9 * float(ref.abs().max())
    assert moved > 0  # the adapter really moved zero-points
    for key in ckpt.other_tensor_names():  # embeddings, norms, lm head: copied as they are
        assert torch.equal(merged.read_tensor(key), ckpt.read_tensor(key)), key

    meta = json.loads((out / "config.json").read_text())["quantization_config"]["meta"][META_KEY]
    assert meta["merged"] is True and meta["exact"] is True and meta["zeros_moved"] == 0
    assert meta["base_fingerprint"] == ckpt.fingerprint() and meta["adapter_fingerprint"].startswith("sha256:")
    assert merged.config.checkpoint_format == "gptq_v2" and merged.config.bits == BITS
    assert merged.config.group_size == GROUP
    assert not [p.name for p in tmp_path.iterdir() if p.name != "out"]  # no temporary directory left


def test_integral_adapter_passes_require_exact(base, integral_adapter, tmp_path):
    summary = export(MergedView.open(base, integral_adapter), tmp_path / "out", require_exact=True)
    assert summary["exact"] is True and (tmp_path / "out" / "model.safetensors").is_file()


def test_random_adapter_rounds_to_nearest_and_reports_it(base, random_adapter, tmp_path):
    model = MergedView.open(base, random_adapter)
    out = tmp_path / "out"
    summary = export(model, out)
    merged, ckpt = GPTQCheckpoint(out), GPTQCheckpoint(base)
    assert summary["exact"] is False
    assert summary["zeros_moved"] > 0 and summary["zeros_clamped"] == 0
    assert 0.0 < summary["max_zero_change"] <= 0.5
    moved, change = 0, 0.0
    for name in ckpt.quantized_modules:
        folded, _ = model.read_layer(name)
        written = merged.read_layer(name)
        assert torch.equal(written.codes, folded.codes) and torch.equal(written.scales, folded.scales)
        assert torch.equal(written.zeros, torch.round(folded.zeros))
        n_moved = int((folded.zeros != torch.round(folded.zeros)).sum())
        layer_change = float((written.zeros - folded.zeros).abs().max())
        assert summary["per_layer"][name]["moved"] == n_moved
        assert summary["per_layer"][name]["max_change"] == pytest.approx(layer_change, abs=0)
        moved, change = moved + n_moved, max(change, layer_change)
        # the weight moves by at most half a scale per element
        err = (written.dequantize(torch.float64) - folded.dequantize(torch.float64)).abs()
        assert bool((err <= 0.5 * folded.scales.double()[folded.g_idx].T + 1e-12).all())
    assert summary["zeros_moved"] == moved and summary["max_zero_change"] == change
    assert summary["max_fold_shift"] > 0.5  # the fixture's adapter moves zeros by more than rounding
    meta = json.loads((out / "config.json").read_text())["quantization_config"]["meta"][META_KEY]
    assert meta["exact"] is False and meta["zeros_moved"] == moved and meta["zero_rounding"] == "nearest"


def test_require_exact_refuses_fractional_zeros_and_writes_nothing(base, random_adapter, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FoldError, match=r"model\.layers\.\d+\.(self_attn|mlp)\.[a-z]+_proj: \d+ of \d+ folded "
                                        r"zero-points are not integers .*--require-exact"):
        export(MergedView.open(base, random_adapter), out, require_exact=True)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no partial directory either


# ----------------------------------------------------------------------------------- zero range


def test_v1_refuses_a_folded_zero_of_0_naming_gptq_v2(base_v1, zero_adapter, tmp_path):
    adapter_dir, _ = zero_adapter
    out = tmp_path / "out"
    with pytest.raises(FormatLimitError,
                       match=r"model\.layers\.\d+\..*_proj: \d+ folded zero-point\(s\) fall outside \[1, 15\].*"
                             r"use --checkpoint-format gptq_v2.*--clamp-zeros"):
        export(MergedView.open(base_v1, adapter_dir), out)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_v1_clamp_zeros_clamps_to_1_and_reports_it(base_v1, zero_adapter, tmp_path):
    adapter_dir, masks = zero_adapter
    model = MergedView.open(base_v1, adapter_dir)
    summary = export(model, tmp_path / "out", clamp_zeros=True)
    merged = GPTQCheckpoint(tmp_path / "out")
    assert summary["checkpoint_format"] == "gptq"
    assert summary["zeros_clamped"] == sum(int(m.sum()) for m in masks.values()) > 0
    assert summary["zeros_moved"] == 0  # the fold is integral, only the range is violated
    assert summary["exact"] is False and summary["max_zero_change"] == 1.0
    for name, mask in masks.items():
        folded, _ = model.read_layer(name)
        assert torch.equal(folded.zeros[mask], torch.zeros(int(mask.sum()), dtype=torch.float64))
        written = merged.read_layer(name)
        assert bool((written.zeros[mask] == 1).all())
        assert torch.equal(written.zeros[~mask], folded.zeros[~mask])
        assert summary["per_layer"][name]["clamped"] == int(mask.sum())
    meta = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["meta"][META_KEY]
    assert meta["zeros_clamped"] == summary["zeros_clamped"] and meta["exact"] is False


def test_v1_base_to_gptq_v2_holds_the_zero_exactly(base_v1, zero_adapter, tmp_path):
    adapter_dir, masks = zero_adapter
    model = MergedView.open(base_v1, adapter_dir)
    summary = export(model, tmp_path / "out", checkpoint_format="gptq_v2")
    assert summary["exact"] is True and summary["checkpoint_format"] == "gptq_v2"
    merged = GPTQCheckpoint(tmp_path / "out")
    assert merged.config.checkpoint_format == "gptq_v2"
    for name in masks:
        assert_same_layer(merged.read_layer(name), model.read_layer(name)[0])


def test_unknown_checkpoint_format_is_refused(base, tmp_path):
    with pytest.raises(FormatLimitError, match=r"--checkpoint-format 'gptq_v3': choose one of \('gptq', 'gptq_v2'\)"):
        export(MergedView.open(base), tmp_path / "out", checkpoint_format="gptq_v3")
    assert not (tmp_path / "out").exists()


def _record(zeros: list[list[float]], bits: int = 4) -> QuantizedLinear:
    zeros_t = torch.tensor(zeros, dtype=torch.float64)
    G, n_out = zeros_t.shape
    gen = torch.Generator().manual_seed(0)
    return QuantizedLinear(name="model.layers.0.mlp.up_proj", bits=bits, group_size=8,
                           codes=torch.randint(0, 1 << bits, (n_out, 8 * G), generator=gen, dtype=torch.uint8),
                           scales=torch.rand(G, n_out, generator=gen) + 0.01, zeros=zeros_t,
                           g_idx=contiguous_g_idx(8 * G, 8))


def test_integer_zeros_rounds_half_to_even_and_counts():
    layer = _record([[0.0, 2.5, 3.25, 15.0], [7.0, 6.5, 1.75, 4.0]])
    out, result = integer_zeros(layer, "gptq_v2", clamp=False)
    assert out.zeros.tolist() == [[0.0, 2.0, 3.0, 15.0], [7.0, 6.0, 2.0, 4.0]]
    assert result == ZeroPolicyResult(moved=4, max_change=0.5, clamped=0)
    assert out.codes is layer.codes and out.scales is layer.scales  # only the zeros change
    assert layer.zeros[0, 1] == 2.5  # the input record is not modified


def test_integer_zeros_range_errors_and_clamping():
    assert zero_range(4, "gptq") == (1, 15) and zero_range(4, "gptq_v2") == (0, 15)
    zero = _record([[0.2, 5.0], [9.0, 15.0]])
    with pytest.raises(FormatLimitError, match=r"up_proj: 1 folded zero-point\(s\) fall outside \[1, 15\].*"
                                               r"min 0, max 15\).*use --checkpoint-format gptq_v2"):
        integer_zeros(zero, "gptq", clamp=False)
    out, result = integer_zeros(zero, "gptq", clamp=True)
    assert out.zeros.tolist() == [[1.0, 5.0], [9.0, 15.0]]
    assert result.clamped == 1 and result.moved == 1 and result.max_change == pytest.approx(0.8)
    assert integer_zeros(zero, "gptq_v2", clamp=False)[0].zeros.tolist() == [[0.0, 5.0], [9.0, 15.0]]

    below = _record([[-1.0, 5.0]])  # below what v1 could hold even in v2: no gptq_v2 hint
    with pytest.raises(FormatLimitError) as info:
        integer_zeros(below, "gptq", clamp=False)
    assert "gptq_v2" not in str(info.value) and "--clamp-zeros" in str(info.value)
    above = _record([[15.6, 3.0], [16.0, 2.0]])
    with pytest.raises(FormatLimitError, match=r"2 folded zero-point\(s\) fall outside \[0, 15\]") as info:
        integer_zeros(above, "gptq_v2", clamp=False)
    assert "checkpoint-format" not in str(info.value)
    out, result = integer_zeros(above, "gptq_v2", clamp=True)
    assert out.zeros.tolist() == [[15.0, 3.0], [15.0, 2.0]] and result.clamped == 2
    assert result.max_change == pytest.approx(1.0) and result.moved == 1
    two_bit = _record([[3.4, 0.0]], bits=2)
    assert integer_zeros(two_bit, "gptq_v2", clamp=False)[0].zeros.tolist() == [[3.0, 0.0]]
    with pytest.raises(FormatLimitError, match=r"outside \[0, 3\]"):
        integer_zeros(_record([[3.6, 0.0]], bits=2), "gptq_v2", clamp=False)


# ----------------------------------------------------------------------------------- files


def test_small_shards_and_their_index(base, integral_adapter, tmp_path):
    model = MergedView.open(base, integral_adapter)
    one = export(model, tmp_path / "one")
    many = export(model, tmp_path / "many", max_shard_bytes=6_000)
    shards = sorted(p.name for p in (tmp_path / "many").glob("*.safetensors"))
    assert len(shards) > 2
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    assert not (tmp_path / "many" / "model.safetensors").exists()
    assert not (tmp_path / "one" / INDEX_FILE).exists()
    index = json.loads((tmp_path / "many" / INDEX_FILE).read_text())
    holder = {name: shard for shard in shards for name in safetensors_header(tmp_path / "many" / shard)}
    assert index["weight_map"] == holder  # every tensor, in the shard that holds it
    assert set(holder) == {s.name for s in planned_tensors(model, "gptq_v2")}
    sizes = {shard: sum(e["data_offsets"][1] - e["data_offsets"][0]
                        for e in safetensors_header(tmp_path / "many" / shard).values()) for shard in shards}
    assert index["metadata"]["total_size"] == sum(sizes.values()) == many["bytes"] == one["bytes"]
    for shard, size in sizes.items():  # a tensor over the limit (the embedding, 16 KiB) gets a shard of its own
        assert size <= 6_000 or len(safetensors_header(tmp_path / "many" / shard)) == 1, shard
    assert max(sizes.values()) > 6_000
    a, b = GPTQCheckpoint(tmp_path / "one"), GPTQCheckpoint(tmp_path / "many")
    assert set(a.tensor_files) == set(b.tensor_files)
    for key in a.tensor_files:
        assert torch.equal(a.read_tensor(key), b.read_tensor(key)), key
    one.pop("path"), many.pop("path")
    assert one == many


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_planned_tensors_are_what_is_written(base, random_adapter, tmp_path, fmt):
    model = MergedView.open(base, random_adapter)
    planned = planned_tensors(model, fmt)
    names = [s.name for s in planned]
    assert len(names) == len(set(names))
    export(model, tmp_path / "out", checkpoint_format=fmt, max_shard_bytes=20_000, clamp_zeros=True)
    assert {s.name: (s.dtype, tuple(s.shape)) for s in planned} == written_specs(tmp_path / "out")
    # per layer: qweight, qzeros, scales, g_idx first, in the base's module order; then the float tensors
    suffixes = ("qweight", "qzeros", "scales", "g_idx")
    per_layer = [f"{m}.{suffix}" for m in model.quantized_modules for suffix in suffixes]
    assert names[:len(per_layer)] == per_layer
    assert names[len(per_layer):] == model.other_tensor_names()
    for spec in planned[:len(per_layer)]:
        assert spec.dtype == OUTPUT_DTYPES[spec.name.rsplit(".", 1)[1]]
    ckpt = GPTQCheckpoint(base)
    for name in model.quantized_modules:
        rec = ckpt.read_layer(name)
        shapes = {s.name.rsplit(".", 1)[1]: tuple(s.shape) for s in planned if s.name.startswith(name + ".")}
        assert shapes == {"qweight": (rec.in_features * BITS // 32, rec.out_features),
                          "qzeros": (rec.num_groups, rec.out_features * BITS // 32),
                          "scales": (rec.num_groups, rec.out_features), "g_idx": (rec.in_features,)}


def test_tokenizer_files_are_copied_and_weights_and_configs_are_not(base, integral_adapter, tmp_path):
    out = tmp_path / "out"
    export(MergedView.open(base, integral_adapter), out)
    names = {p.name for p in out.iterdir()}
    assert TOKENIZER_FILES <= {p.name for p in base.iterdir()}
    assert names == TOKENIZER_FILES | {"config.json", "quantize_config.json", "model.safetensors"}
    for name in TOKENIZER_FILES:
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    assert (out / "config.json").read_bytes() != (base / "config.json").read_bytes()  # rewritten with the meta


def test_copy_tokenizer_files_skips_weights_configs_hidden_files_and_folders(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir(), dst.mkdir()
    payload = {}
    for name in ("config.json", "quantize_config.json", INDEX_FILE, "model.safetensors",
                 "model-00001-of-00002.safetensors", ".hidden", "tokenizer.json", "vocab.txt", "merges.txt",
                 "generation_config.json", "special_tokens_map.json"):
        payload[name] = hashlib.sha256(name.encode()).digest() * 3
        (src / name).write_bytes(payload[name])
    (src / "sub").mkdir()
    (src / "sub" / "tokenizer.model").write_bytes(b"nested")
    copy_tokenizer_files(src, dst)
    copied = {p.name for p in dst.iterdir()}
    assert copied == {"tokenizer.json", "vocab.txt", "merges.txt", "generation_config.json", "special_tokens_map.json"}
    assert all((dst / n).read_bytes() == payload[n] for n in copied)


def test_existing_output_is_refused_unless_overwrite(base, integral_adapter, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    model = MergedView.open(base, integral_adapter)
    with pytest.raises(OutputExistsError, match="already exists"):
        export(model, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    summary = export(model, out, overwrite=True)
    assert summary["exact"] is True
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_inputs_are_never_modified(base, base_v1, integral_adapter, random_adapter, zero_adapter, inputs_digest,
                                   tmp_path):
    """The digest was taken before the module's first test (autouse fixture); this runs after every export
    above and repeats the failing ones: nothing in the base or adapter directories changed."""
    export(MergedView.open(base, random_adapter), tmp_path / "a", max_shard_bytes=5_000)
    with pytest.raises(FoldError):
        export(MergedView.open(base, random_adapter), tmp_path / "b", require_exact=True)
    with pytest.raises(FormatLimitError):
        export(MergedView.open(base_v1, zero_adapter[0]), tmp_path / "c")
    for directory, digest in inputs_digest.items():
        assert dir_digest(Path(directory)) == digest, directory
