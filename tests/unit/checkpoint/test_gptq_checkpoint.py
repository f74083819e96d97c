"""Tests of qalora_export.checkpoint.gptq: the AutoGPTQ codec, the streaming reader and the writer.

Bad input must give a :class:`CheckpointError` naming the file or tensor, never a crash from
safetensors or torch. (Golden tests against GPTQModel itself: ``test_gptq_golden.py``.)
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import tiny_models
from qalora_export.errors import CheckpointError, FormatLimitError
from qalora_export.checkpoint.gptq_config import INDEX_FILE, GPTQConfig, parse_gptq_config, zero_range
from qalora_export.checkpoint.gptq_writer import CheckpointWriter, write_configs
from qalora_export.checkpoint.gptq import GPTQCheckpoint
from qalora_export.checkpoint.gptq_codec import decode_layer, decode_zeros, encode_layer
from qalora_export.core.packing import pack_codes, unpack_codes
from qalora_export.core.record import quantize_rtn

BITS = (2, 3, 4, 8)
FORMATS = ("gptq", "gptq_v2")


def random_record(bits: int, fmt: str, act_order: bool, out: int | None = None, in_: int = 64, group_size: int = 16,
                  bias: bool = True, seed: int = 0):
    if out is None:  # a partial packing cycle of qzeros where the format allows one (not 3-bit)
        out = 64 if bits == 3 else 40
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, in_, generator=gen) * 0.1
    g_idx = None
    if act_order:
        g_idx = (torch.arange(in_) // group_size)[torch.randperm(in_, generator=gen)]
    return quantize_rtn("model.layers.0.mlp.up_proj", w, bits, group_size,
                        bias=torch.randn(out, generator=gen) if bias else None, g_idx=g_idx,
                        min_zero=1 if fmt == "gptq" else 0)


def assert_same_record(a, b):
    assert a.bits == b.bits and a.group_size == b.group_size
    assert torch.equal(a.codes, b.codes)
    assert torch.equal(a.scales, b.scales)
    assert torch.equal(a.zeros, b.zeros)
    assert torch.equal(a.g_idx, b.g_idx)
    assert (a.bias is None) == (b.bias is None)
    if a.bias is not None:
        assert torch.equal(a.bias.half(), b.bias.half())


# ----------------------------------------------------------------------------- codec


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("act_order", [False, True])
def test_encode_decode_round_trip(bits, fmt, act_order):
    rec = random_record(bits, fmt, act_order)
    cfg = GPTQConfig(bits, 16, act_order, False, fmt)
    tensors = encode_layer(rec, fmt)
    back = decode_layer(rec.name, tensors, cfg)
    assert_same_record(rec, back)
    assert back.is_act_order == act_order


@pytest.mark.parametrize("bits", BITS)
def test_encoded_tensors_follow_the_spec_table(bits):
    out, in_, gs = 64, 128, 32  # multiples of 32: the widths GPTQ runtimes accept for every bit width
    rec = random_record(bits, "gptq_v2", False, out=out, in_=in_, group_size=gs)
    t = encode_layer(rec, "gptq_v2")
    assert t["qweight"].dtype == torch.int32 and t["qweight"].shape == (in_ * bits // 32, out)
    assert t["qzeros"].dtype == torch.int32 and t["qzeros"].shape == (in_ // gs, out * bits // 32)
    assert t["scales"].dtype == torch.float16 and t["scales"].shape == (in_ // gs, out)
    assert t["g_idx"].dtype == torch.int32 and torch.equal(t["g_idx"], (torch.arange(in_) // gs).int())
    assert t["bias"].dtype == torch.float16 and t["bias"].shape == (out,)
    # qweight packs codes along `in`: unpacking column o gives row o of the codes
    assert torch.equal(unpack_codes(t["qweight"], bits, 0, in_).T, rec.codes)


@pytest.mark.parametrize("bits", BITS)
def test_zero_conventions_v1_stores_zero_minus_one(bits):
    rec = random_record(bits, "gptq", False, bias=False)
    v1 = encode_layer(rec, "gptq")["qzeros"]
    v2 = encode_layer(rec, "gptq_v2")["qzeros"]
    stored_v1 = unpack_codes(v1, bits, 1, rec.out_features).long()
    stored_v2 = unpack_codes(v2, bits, 1, rec.out_features).long()
    assert torch.equal(stored_v2, rec.zeros.long())
    assert torch.equal(stored_v1, rec.zeros.long() - 1)
    assert torch.equal(decode_zeros(v1, bits, rec.out_features, "gptq"), rec.zeros.long())
    assert torch.equal(decode_zeros(v2, bits, rec.out_features, "gptq_v2"), rec.zeros.long())


def test_zero_ranges():
    assert zero_range(4, "gptq") == (1, 15)
    assert zero_range(4, "gptq_v2") == (0, 15)
    assert zero_range(2, "gptq") == (1, 3)
    assert zero_range(8, "gptq_v2") == (0, 255)


def test_v1_stored_minus_one_decodes_as_the_runtimes_do():
    # A v1 checkpoint holding a true zero of 0 stores -1, i.e. all ones in the field. GPTQModel's
    # v1 -> v2 conversion adds 0x11111111 to each whole 4-bit word, so the field wraps to 0 and its
    # carry bumps the next field: true zeros [0, 5, 7, ...] decode as [0, 6, 7, ...].
    stored = torch.tensor([[15, 4, 6, 6, 6, 6, 6, 15]])  # last field: its carry leaves the word
    words = pack_codes(stored, 4, dim=1)
    assert decode_zeros(words, 4, 8, "gptq")[0].tolist() == [0, 6, 7, 7, 7, 7, 7, 0]
    # 3-bit: field by field, modulo 8 (no carries across fields)
    stored3 = torch.tensor([[7, 4] + [2] * 30])
    assert decode_zeros(pack_codes(stored3, 3, dim=1), 3, 32, "gptq")[0].tolist() == [0, 5] + [3] * 30


def test_encode_refuses_zeros_the_format_cannot_hold():
    rec = random_record(4, "gptq_v2", False)
    with pytest.raises(FormatLimitError, match="must be integers; round them first"):
        encode_layer(rec.with_zeros(rec.zeros + 0.25), "gptq_v2")
    zeros = rec.zeros.clone()
    zeros[0, 0] = 0
    with pytest.raises(FormatLimitError, match=r"gptq 4-bit holds \[1, 15\].*use --checkpoint-format gptq_v2"):
        encode_layer(rec.with_zeros(zeros), "gptq")
    zeros[0, 0] = 16
    with pytest.raises(FormatLimitError, match=r"span \[\d+, 16\] but gptq_v2 4-bit holds \[0, 15\]"):
        encode_layer(rec.with_zeros(zeros), "gptq_v2")
    zeros[0, 0] = -1
    with pytest.raises(FormatLimitError, match=r"span \[-1, "):
        encode_layer(rec.with_zeros(zeros), "gptq_v2")


@pytest.mark.parametrize("out, in_", [(40, 64), (64, 48)])
def test_encode_refuses_3bit_widths_the_runtimes_cannot_load(out, in_):
    rec = random_record(3, "gptq_v2", False, out=out, in_=in_)
    with pytest.raises(FormatLimitError, match=rf"3-bit GPTQ packs 32 codes into 3 words.*it is {out}x{in_} "
                                               r"\(out x in\).*Use --bits 2, 4 or 8"):
        encode_layer(rec, "gptq_v2")
    for bits in (2, 4, 8):  # whole-word widths: any width packs as GPTQModel expects
        encode_layer(random_record(bits, "gptq_v2", False, out=out, in_=in_), "gptq_v2")


def test_encode_does_not_modify_the_record():
    rec = random_record(3, "gptq", True)
    copies = [t.clone() for t in (rec.codes, rec.scales, rec.zeros, rec.g_idx, rec.bias)]
    encode_layer(rec, "gptq")
    for a, b in zip(copies, (rec.codes, rec.scales, rec.zeros, rec.g_idx, rec.bias)):
        assert torch.equal(a, b)


def test_decode_without_g_idx_and_group_size_minus_one():
    rec = random_record(4, "gptq_v2", False, group_size=64, bias=False)
    t = encode_layer(rec, "gptq_v2")
    del t["g_idx"]
    back = decode_layer(rec.name, t, GPTQConfig(4, -1, False, False, "gptq_v2"))
    assert back.group_size == 64 and back.num_groups == 1
    assert_same_record(rec, back)


@pytest.mark.parametrize("mutate, match", [
    (lambda t: t.pop("scales"), r"missing tensors model.layers.0.mlp.up_proj.scales"),
    (lambda t: t.update(qweight=t["qweight"].float()), r"qweight: expected a 2-D torch.int32 tensor"),
    (lambda t: t.update(scales=t["scales"][0]), r"scales: expected a 2-D"),
    (lambda t: t.update(scales=t["scales"][:2]), r"scales: shape \(2, 64\), expected \(4, 64\)"),
    (lambda t: t.update(g_idx=t["g_idx"][:10]), r"g_idx: shape \(10,\), expected \(64,\)"),
    (lambda t: t.update(g_idx=t["g_idx"] - 1), r"g_idx: negative group index -1"),
    (lambda t: t.update(g_idx=t["g_idx"] + 1), r"scales: shape \(4, 64\), expected \(5, 64\)"),
    (lambda t: t.update(qzeros=t["qzeros"][:3]), r"qzeros: 3 rows, expected 4 groups"),
    (lambda t: t.update(qzeros=t["qzeros"][:, :1]), r"packed tensors do not match 3-bit, 64x64"),
    (lambda t: t.update(qweight=t["qweight"][:5]), r"qweight: 5 rows is not a whole number of 3-bit packing cycles"),
    (lambda t: t.update(qweight=t["qweight"][:3]), r"g_idx: shape \(64,\), expected \(32,\)"),
    (lambda t: t["scales"].__setitem__((1, 3), float("nan")), r"scales: contains NaN or inf"),
])
def test_decode_refuses_malformed_tensors(mutate, match):
    rec = random_record(3, "gptq_v2", False)
    t = encode_layer(rec, "gptq_v2")
    mutate(t)
    with pytest.raises(CheckpointError, match=match):
        decode_layer(rec.name, t, GPTQConfig(3, 16, False, False, "gptq_v2"))


# ----------------------------------------------------------------------------- config parsing


GOOD = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": False,
        "checkpoint_format": "gptq"}


@pytest.mark.parametrize("change, match", [
    ({"bits": None}, r"bits=None is not supported"),
    ({"bits": 5}, r"bits=5 is not supported"),
    ({"bits": "4"}, r"bits='4' is not supported"),
    ({"group_size": None}, r"group_size=None must be a positive integer"),
    ({"group_size": 0}, r"group_size=0"),
    ({"group_size": -2}, r"group_size=-2"),
    ({"group_size": True}, r"group_size=True"),
    ({"group_size": 32.0}, r"group_size=32.0"),
    ({"quant_method": "awq"}, r"quant_method is 'awq'; only GPTQ"),
    ({"checkpoint_format": "marlin"}, r"checkpoint_format='marlin' is not readable"),
    ({"pack_dtype": "int16"}, r"pack_dtype='int16'"),
])
def test_parse_config_refusals(change, match):
    obj = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    with pytest.raises(CheckpointError, match=match):
        parse_gptq_config(obj, Path("x/config.json"))


def test_parse_config_defaults_and_format_alias():
    cfg = parse_gptq_config({"bits": 3, "group_size": -1, "format": "gptq_v2"}, Path("q.json"))
    assert cfg == GPTQConfig(3, -1, False, True, "gptq_v2")
    assert parse_gptq_config({"bits": 8, "group_size": 128}, Path("q.json")).checkpoint_format == "gptq"
    round_trip = parse_gptq_config(GPTQConfig(2, 64, True, False, "gptq").to_json(), Path("q.json"))
    assert round_trip == GPTQConfig(2, 64, True, False, "gptq")


# ----------------------------------------------------------------------------- reader


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    return tiny_models.make_tiny_base(tmp_path_factory.mktemp("fmt") / "base", bits=3, group_size=16,
                                      act_order=True, checkpoint_format="gptq")


def copy_base(tiny_base: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(tiny_base, dst)
    return dst


def read_everything(directory: Path) -> None:
    ckpt = GPTQCheckpoint(directory)
    for name in ckpt.quantized_modules:
        ckpt.read_layer(name)
    for name in ckpt.other_tensor_names():
        ckpt.read_tensor(name)


def test_reader_lists_modules_and_decodes(tiny_base):
    ckpt = GPTQCheckpoint(tiny_base)
    assert ckpt.config == GPTQConfig(3, 16, True, False, "gptq")
    assert len(ckpt.quantized_modules) == 14  # 2 layers x 7 projections
    assert "model.layers.0.self_attn.q_proj" in ckpt.quantized_modules
    others = ckpt.other_tensor_names()
    assert "model.embed_tokens.weight" in others and not any(n.endswith((".qweight", ".g_idx")) for n in others)
    layers = list(ckpt.iter_layers())
    assert all(layer.is_act_order and layer.bits == 3 for layer in layers)
    assert ckpt.fingerprint().startswith("sha256:") and ckpt.fingerprint() == GPTQCheckpoint(tiny_base).fingerprint()


def test_sharded_checkpoint_reads_the_same_and_keeps_its_fingerprint(tiny_base, tmp_path):
    ckpt = GPTQCheckpoint(tiny_base)
    out = tmp_path / "sharded"
    out.mkdir()
    writer = CheckpointWriter(out, max_shard_bytes=20_000)
    with safe_open(str(tiny_base / "model.safetensors"), "pt") as f:
        for key in f.keys():
            writer.add_tensor(key, f.get_tensor(key))
    names = writer.finish()
    assert len(names) > 2 and all(n.endswith(f"-of-{len(names):05d}.safetensors") for n in names)
    for item in ("config.json", "quantize_config.json"):
        shutil.copy(tiny_base / item, out / item)
    index = json.loads((out / INDEX_FILE).read_text())
    assert set(index["weight_map"].values()) == set(names)
    sharded = GPTQCheckpoint(out)
    assert sharded.quantized_modules == ckpt.quantized_modules
    assert sharded.fingerprint() == ckpt.fingerprint()
    for name in ckpt.quantized_modules:
        assert_same_record(ckpt.read_layer(name), sharded.read_layer(name))
    assert not list(out.glob(".shard-*"))


def test_writer_state_machine(tmp_path):
    writer = CheckpointWriter(tmp_path)
    writer.add_tensor("a", torch.zeros(3))
    assert writer.finish() == ["model.safetensors"]
    with pytest.raises(RuntimeError, match="after finish"):
        writer.add_tensor("b", torch.zeros(3))
    with pytest.raises(RuntimeError, match="finish"):
        writer.finish()


def test_quantize_config_json_fallback(tiny_base, tmp_path):
    d = copy_base(tiny_base, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["quantization_config"]
    (d / "config.json").write_text(json.dumps(cfg))
    assert GPTQCheckpoint(d).config.bits == 3


def test_write_configs_round_trip(tmp_path):
    write_configs(tmp_path, {"model_type": "llama", "quantization_config": {"bits": 8}},
                  GPTQConfig(4, 32, True, False, "gptq_v2"), {"quantizer_method": "rtn"})
    cfg = json.loads((tmp_path / "config.json").read_text())
    q = json.loads((tmp_path / "quantize_config.json").read_text())
    assert cfg["quantization_config"] == q
    assert q["bits"] == 4 and q["checkpoint_format"] == q["format"] == "gptq_v2" and q["desc_act"] is True
    assert q["meta"]["quantizer_method"] == "rtn" and cfg["model_type"] == "llama"
    assert parse_gptq_config(q, tmp_path) == GPTQConfig(4, 32, True, False, "gptq_v2")


@pytest.mark.parametrize("cut", ["tail", "half", "header", "tiny", "empty"])
def test_truncated_safetensors(tiny_base, tmp_path, cut):
    d = copy_base(tiny_base, tmp_path)
    path = d / "model.safetensors"
    data = path.read_bytes()
    n = {"tail": len(data) - 100, "half": len(data) // 2, "header": 100, "tiny": 7, "empty": 0}[cut]
    path.write_bytes(data[:n])
    with pytest.raises(CheckpointError, match=r"model.safetensors is not a readable safetensors file.*truncated or corrupt"):
        read_everything(d)


@pytest.mark.parametrize("corrupt", ["length", "utf8", "json", "offsets"])
def test_corrupted_header(tiny_base, tmp_path, corrupt):
    d = copy_base(tiny_base, tmp_path)
    path = d / "model.safetensors"
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    if corrupt == "length":
        data = struct.pack("<Q", 10**12) + data[8:]
    elif corrupt == "utf8":
        data = data[:8] + b"\x00\xff" + data[10:]
    elif corrupt == "json":
        data = data[:20] + b"XXXX" + data[24:]
    else:
        header = data[8:8 + n].replace(b'"data_offsets":[0,', b'"data_offsets":[9,')
        data = data[:8] + header + data[8 + n:]
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=r"model.safetensors is not a readable safetensors file"):
        read_everything(d)


@pytest.mark.parametrize("field", ["bits", "group_size"])
def test_missing_config_fields(tiny_base, tmp_path, field):
    d = copy_base(tiny_base, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["quantization_config"][field]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=rf"config.json: {field}=None"):
        GPTQCheckpoint(d)


def test_missing_or_broken_files(tiny_base, tmp_path):
    with pytest.raises(CheckpointError, match="is not a directory"):
        GPTQCheckpoint(tmp_path / "nope")
    d = copy_base(tiny_base, tmp_path)
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config.json is not valid JSON \(line 1"):
        GPTQCheckpoint(d)
    (d / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="must hold a JSON object, found list"):
        GPTQCheckpoint(d)
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="has no config.json"):
        GPTQCheckpoint(d)


def test_not_quantized_and_no_weights(tiny_base, tmp_path):
    d = copy_base(tiny_base, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["quantization_config"]
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "quantize_config.json").unlink()
    with pytest.raises(CheckpointError, match="no quantization_config.*qalora-export quantize"):
        GPTQCheckpoint(d)
    d2 = copy_base(tiny_base, tmp_path / "b")
    (d2 / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no model.safetensors and no model.safetensors.index.json"):
        GPTQCheckpoint(d2)
    save_file({"x": torch.zeros(2)}, str(d2 / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"no \*.qweight tensors"):
        GPTQCheckpoint(d2)


def test_missing_tensor_of_a_layer(tiny_base, tmp_path):
    d = copy_base(tiny_base, tmp_path)
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "model.layers.1.mlp.down_proj.scales"}
    save_file(tensors, str(d / "model.safetensors"))
    ckpt = GPTQCheckpoint(d)
    ckpt.read_layer("model.layers.0.mlp.down_proj")
    with pytest.raises(CheckpointError, match="missing tensors model.layers.1.mlp.down_proj.scales"):
        ckpt.read_layer("model.layers.1.mlp.down_proj")
    with pytest.raises(CheckpointError, match="tensor model.layers.9.x is missing"):
        ckpt.read_tensor("model.layers.9.x")


def make_two_shard_copy(tiny_base: Path, tmp_path: Path) -> Path:
    d = copy_base(tiny_base, tmp_path)
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    (d / "model.safetensors").unlink()
    keys = sorted(tensors)
    half = len(keys) // 2
    parts = {"model-00001-of-00002.safetensors": keys[:half], "model-00002-of-00002.safetensors": keys[half:]}
    weight_map = {}
    for fname, ks in parts.items():
        save_file({k: tensors[k] for k in ks}, str(d / fname))
        weight_map.update({k: fname for k in ks})
    (d / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    GPTQCheckpoint(d)  # the copy itself is valid
    return d


def test_index_naming_a_tensor_the_shard_lacks(tiny_base, tmp_path):
    d = make_two_shard_copy(tiny_base, tmp_path)
    index = json.loads((d / INDEX_FILE).read_text())
    index["weight_map"]["model.layers.0.mlp.up_proj.qweight"] = "model-00002-of-00002.safetensors"
    index["weight_map"]["model.extra.weight"] = "model-00001-of-00002.safetensors"
    (d / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"says model.(layers.0.mlp.up_proj.qweight|extra.weight) is in "
                                               r"model-0000\d-of-00002.safetensors, but that shard does not hold it"):
        GPTQCheckpoint(d)


def test_index_naming_a_missing_shard_or_empty(tiny_base, tmp_path):
    d = make_two_shard_copy(tiny_base, tmp_path)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="weights file .*model-00002-of-00002.safetensors is missing"):
        GPTQCheckpoint(d)
    (d / INDEX_FILE).write_text(json.dumps({"weight_map": {}}))
    with pytest.raises(CheckpointError, match="weight_map is missing or empty"):
        GPTQCheckpoint(d)


def test_index_cannot_point_outside_the_directory(tiny_base, tmp_path):
    d = make_two_shard_copy(tiny_base, tmp_path)
    outside = tmp_path / "outside.safetensors"
    save_file({"model.secret": torch.zeros(1)}, str(outside))
    index = json.loads((d / INDEX_FILE).read_text())
    index["weight_map"]["model.secret"] = "../outside.safetensors"
    (d / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"outside.safetensors.*not a file name inside"):
        GPTQCheckpoint(d)


def test_reader_does_not_modify_the_checkpoint(tiny_base):
    before = {p.name: p.read_bytes() for p in tiny_base.iterdir()}
    read_everything(tiny_base)
    GPTQCheckpoint(tiny_base).fingerprint()
    assert {p.name: p.read_bytes() for p in tiny_base.iterdir()} == before
