"""Streaming of the GPTQ path: planned shards, verbatim codes, byte-identical to the buffered writer.

The merge used to unpack every layer, fold, repack, and hold a whole shard in memory for
``save_file``. It now copies qweight/scales/g_idx, re-encodes only qzeros and writes shards tensor by
tensor. These tests pin that the files are the same bytes as the original path (reimplemented
here: decode, fold, round, encode, ``save_file`` per shard), for every bit width, both zero
conventions, act-order, sharded input and sharded output.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tiny_models
from qalora_export.formats.gptq import FORMAT as gptq_converter
from qalora_export.formats.gptq import encode as gptq_encode
from qalora_export.checkpoint.gptq_config import INDEX_FILE
from qalora_export.checkpoint.gptq_writer import CheckpointWriter
from qalora_export.checkpoint.gptq import GPTQCheckpoint
from qalora_export.checkpoint.gptq_codec import encode_layer
from qalora_export.checkpoint.merged_view import MergedView
from qalora_export.storage.safetensors_stream import TensorSpec, header_bytes, plan_shards

CASES = [  # bits, group size, act-order, checkpoint format
    (2, 16, False, "gptq_v2"),
    (3, 32, True, "gptq"),
    (4, 32, False, "gptq"),
    (4, 32, True, "gptq_v2"),
    (8, 32, False, "gptq_v2"),
]


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("scale_bases")
    made = {}
    for bits, gs, act, fmt in CASES:
        base = tiny_models.make_tiny_base(root / f"b{bits}-{gs}-{act}-{fmt}", bits=bits, group_size=gs,
                                          act_order=act, checkpoint_format=fmt, seed=bits,
                                          hidden=64, intermediate=128)
        adapter = tiny_models.make_random_adapter(base, root / f"a{bits}-{gs}-{act}-{fmt}", rank=4, seed=bits)
        made[(bits, gs, act, fmt)] = (base, adapter)
    return made


def original_weight_files(model: MergedView, fmt: str, out: Path, max_shard_bytes: int) -> None:
    """The export's weight files as the code before streaming wrote them: full decode, fold,
    round, encode, and ``save_file`` of each whole shard (the buffered writer of that version)."""
    pending: dict[str, torch.Tensor] = {}
    shards: list[list[str]] = []
    size = 0

    def add(name: str, t: torch.Tensor) -> None:
        nonlocal size
        nbytes = t.numel() * t.element_size()
        if pending and size + nbytes > max_shard_bytes:
            flush()
        pending[name] = t.contiguous()
        size += nbytes

    def flush() -> None:
        nonlocal size
        save_file(dict(pending), str(out / f"shard{len(shards) + 1:05d}"), metadata={"format": "pt"})
        shards.append(sorted(pending))
        pending.clear()
        size = 0

    out.mkdir(parents=True)
    for name in model.quantized_modules:
        folded, _ = model.read_layer(name)
        layer, _ = gptq_encode.integer_zeros(folded, fmt, clamp=False)
        for suffix, t in encode_layer(layer, fmt).items():
            add(f"{name}.{suffix}", t)
    for key in model.other_tensor_names():
        add(key, model.read_tensor(key))
    flush()


def weight_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix == ".safetensors")


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}bit-g{c[1]}-{'act' if c[2] else 'seq'}-{c[3]}")
@pytest.mark.parametrize("max_shard_bytes", [2 * 1024**3, 6_000])
def test_streaming_merge_writes_the_original_bytes(bases, case, max_shard_bytes, tmp_path):
    base, adapter = bases[case]
    model = MergedView.open(base, adapter)
    fmt = case[3]
    gptq_converter.export(model, tmp_path / "new", max_shard_bytes=max_shard_bytes)
    original_weight_files(model, fmt, tmp_path / "old", max_shard_bytes)
    new, old = weight_files(tmp_path / "new"), sorted((tmp_path / "old").iterdir())
    assert len(new) == len(old)
    if max_shard_bytes < 10_000:
        assert len(new) > 2, "the tiny limit must produce several shards"
        index = json.loads((tmp_path / "new" / INDEX_FILE).read_text())
        assert set(index["weight_map"].values()) == {p.name for p in new}
    for a, b in zip(new, old):
        assert a.read_bytes() == b.read_bytes(), f"{a.name} differs from the original export"


def test_sharded_input_to_sharded_output_round_trip(bases, tmp_path):
    """A base resharded into many files merges to many shards, which read back to the same layers
    as a single-file merge of the same base + adapter (and the same fingerprint)."""
    base, adapter = bases[(4, 32, False, "gptq")]
    ckpt = GPTQCheckpoint(base)
    resharded = tmp_path / "base-sharded"
    resharded.mkdir()
    writer = CheckpointWriter(resharded, max_shard_bytes=5_000)
    for key in sorted(ckpt.tensor_files):
        writer.add_tensor(key, ckpt.read_tensor(key))
    assert len(writer.finish()) > 2
    for f in base.iterdir():
        if not f.name.endswith(".safetensors") and f.is_file():
            (resharded / f.name).write_bytes(f.read_bytes())
    assert GPTQCheckpoint(resharded).fingerprint() == ckpt.fingerprint()

    gptq_converter.export(MergedView.open(resharded, adapter), tmp_path / "sharded", max_shard_bytes=7_000)
    gptq_converter.export(MergedView.open(base, adapter), tmp_path / "single")
    sharded, single = GPTQCheckpoint(tmp_path / "sharded"), GPTQCheckpoint(tmp_path / "single")
    assert len(weight_files(tmp_path / "sharded")) > 2 and (tmp_path / "sharded" / INDEX_FILE).is_file()
    assert sharded.quantized_modules == single.quantized_modules
    assert sharded.fingerprint() == single.fingerprint()
    for key in single.tensor_files:
        assert torch.equal(sharded.read_tensor(key), single.read_tensor(key)), key


def test_summary_is_in_module_order_and_unchanged_by_sharding(bases, tmp_path):
    base, adapter = bases[(2, 16, False, "gptq_v2")]
    one = gptq_converter.export(MergedView.open(base, adapter), tmp_path / "one")
    many = gptq_converter.export(MergedView.open(base, adapter), tmp_path / "many", max_shard_bytes=3_000)
    assert list(one["per_layer"]) == GPTQCheckpoint(base).quantized_modules
    one.pop("path"), many.pop("path")
    assert one == many


@pytest.mark.parametrize("limit", [1, 50, 10**9])
def test_checkpoint_writer_matches_save_file(tmp_path, limit):
    """The spooling writer: same files as save_file of each shard; the header alone from specs."""
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "b.int": torch.randint(-5, 5, (3, 7), generator=gen, dtype=torch.int32),
        "a.half": torch.randn(5, generator=gen).to(torch.float16),
        "c.f32": torch.randn(2, 3, generator=gen),
        "d.bf16": torch.randn(4, generator=gen).to(torch.bfloat16),
        "e.u8": torch.randint(0, 255, (9,), generator=gen, dtype=torch.uint8),
        "f.i64": torch.arange(3),
        "g.empty": torch.zeros(0, 4),
    }
    (tmp_path / "w").mkdir()
    writer = CheckpointWriter(tmp_path / "w", max_shard_bytes=limit)
    for name, t in tensors.items():
        writer.add_tensor(name, t)
    names = writer.finish()
    shards = plan_shards([TensorSpec.of(n, t) for n, t in tensors.items()], limit)
    assert len(names) == len(shards)
    assert not [p for p in (tmp_path / "w").iterdir() if p.name.startswith(".")], "spool files left behind"
    for fname, shard in zip(names, shards):
        ref = tmp_path / f"ref-{fname}"
        save_file({s.name: tensors[s.name] for s in shard}, str(ref), metadata={"format": "pt"})
        got = (tmp_path / "w" / fname).read_bytes()
        assert got == ref.read_bytes()
        assert got.startswith(header_bytes(shard, {"format": "pt"}))


# ------------------------------------------------------------------ copies in the kernel


def _stored_file(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    tensors = {"a": torch.randint(-2**31, 2**31 - 1, (37, 5), generator=gen, dtype=torch.int32),
               "b": torch.randn(11, 3, generator=gen).to(torch.float16), "empty": torch.zeros(0, 4)}
    path = tmp_path / "src.safetensors"
    save_file(tensors, str(path))
    return path, tensors


@pytest.mark.parametrize("kernel_copy", ["copy_file_range", "refused", "absent"])
def test_stored_tensors_are_copied_byte_for_byte(tmp_path, monkeypatch, kernel_copy):
    """A file written from StoredTensors (copied file to file) equals the one written from the
    tensors; without a kernel copy (EXDEV, or no os.copy_file_range) the bytes go through here."""
    import errno
    import os

    from qalora_export.storage.safetensors_stream import write_file

    path, tensors = _stored_file(tmp_path)
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    path.rename(base_dir / "model.safetensors")
    ckpt = GPTQCheckpoint.__new__(GPTQCheckpoint)  # just the tensor-file index and header parsing
    ckpt.directory, ckpt.tensor_files = base_dir, {k: base_dir / "model.safetensors" for k in tensors}
    ckpt._handles, ckpt._raw_headers = {}, {}
    if kernel_copy == "refused":
        def refuse(*args):
            raise OSError(errno.EXDEV, "cross-device")
        monkeypatch.setattr(os, "copy_file_range", refuse)
    elif kernel_copy == "absent":
        monkeypatch.delattr(os, "copy_file_range")
    specs = [TensorSpec.of(k, t) for k, t in tensors.items()]
    write_file(tmp_path / "from-tensors.safetensors", specs, lambda k: tensors[k], metadata={"format": "pt"})
    stored = {k: ckpt.stored_tensor(k) for k in tensors}
    assert all(s is not None for s in stored.values())
    write_file(tmp_path / "copied.safetensors", specs, lambda k: stored[k], metadata={"format": "pt"})
    assert (tmp_path / "copied.safetensors").read_bytes() == (tmp_path / "from-tensors.safetensors").read_bytes()


def test_merge_copies_unchanged_tensors_without_reading_them(bases, tmp_path, monkeypatch):
    """qweight, scales, g_idx and the float tensors are copied file to file; only qzeros (and the
    small tensors the fold needs) are read."""
    base, adapter = bases[(4, 32, False, "gptq")]
    read = []
    real = GPTQCheckpoint.read_tensor

    def spy(self, key, rows=None):
        read.append(key)
        return real(self, key, rows)

    monkeypatch.setattr(GPTQCheckpoint, "read_tensor", spy)
    model = MergedView.open(base, adapter)
    read.clear()  # the fingerprint check reads every quantized tensor, by design
    gptq_converter.export(model, tmp_path / "out")
    assert not any(k.endswith(".qweight") or k.endswith("embed_tokens.weight") for k in read)
