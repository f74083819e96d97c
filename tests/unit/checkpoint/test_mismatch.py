"""Mismatch safety, through the command line (``cli.main``: exit code 2 and a message naming why).

An adapter applied to another base (fingerprint), an adapter whose config disagrees with its
tensors (rank), an adapter pooled over other groups than the base quantizes (group size), and a
tokenizer that does not belong to the model (ids beyond the embedding; config vocab_size vs
embedding rows), for every command that would use them.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import gguf_helpers  # noqa: E402
import tiny_models  # noqa: E402

from qalora_export import cli  # noqa: E402

MICRO = dict(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, tie_embeddings=True)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mismatch")
    base = gguf_helpers.make_bpe_base(root / "base", bits=4, group_size=32, seed=0, **MICRO)
    other = gguf_helpers.make_bpe_base(root / "other", bits=4, group_size=32, seed=1, **MICRO)
    g16 = gguf_helpers.make_bpe_base(root / "g16", bits=4, group_size=16, seed=0, **MICRO)
    adapter = tiny_models.make_random_adapter(base, root / "adapter", rank=2)
    adapter16 = tiny_models.make_random_adapter(g16, root / "adapter-g16", rank=2)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"say {i}", "output": f"{i} {i}"}) + "\n" for i in range(12)))
    return {"root": root, "base": base, "other": other, "g16": g16, "adapter": adapter, "adapter16": adapter16,
            "data": data}


def run_cli(capsys, *argv) -> tuple[int, str]:
    # exports run verify's weight level and write the handoff bundle; the runtime level is not needed here
    extra = ["--no-verify"] if str(argv[0]) in ("merge", "gguf", "onnx") else []
    rc = cli.main([str(a) for a in argv] + extra)
    return rc, capsys.readouterr().err


def copy_with(src: Path, dst: Path, edit_json: dict[str, dict] | None = None) -> Path:
    shutil.copytree(src, dst)
    for name, changes in (edit_json or {}).items():
        doc = json.loads((dst / name).read_text())
        for key, value in changes.items():
            if value is None:
                doc.pop(key, None)
            else:
                doc[key] = value
        (dst / name).write_text(json.dumps(doc))
    return dst


# ------------------------------------------------------------------------------ another base


@pytest.mark.parametrize("verb", [["merge", "--to", "gptq"], ["merge", "--to", "onnx"], ["gguf"]])
def test_adapter_on_another_base_is_refused(world, capsys, tmp_path, verb):
    out = tmp_path / ("o.gguf" if verb == ["gguf"] else "o")
    rc, err = run_cli(capsys, *verb[:1], world["other"], world["adapter"], *verb[1:], "-o", out)
    assert rc == 2 and "fingerprint" in err and "different quantized base" in err, err
    assert not out.exists()


def test_verify_against_another_base_is_refused(world, capsys, tmp_path):
    out = tmp_path / "merged"
    assert run_cli(capsys, "merge", world["base"], world["adapter"], "-o", out)[0] == 0
    rc, err = run_cli(capsys, "verify", out, "--base", world["other"], "--adapter", world["adapter"], "--weights-only")
    assert rc == 2 and "fingerprint" in err, err


def test_base_relabelled_v1_no_longer_matches(world, capsys, tmp_path):
    """Same bytes, other zero convention: the v2 fingerprint covers checkpoint_format."""
    relabelled = copy_with(world["base"], tmp_path / "relabelled")
    cfg = json.loads((relabelled / "config.json").read_text())
    cfg["quantization_config"]["checkpoint_format"] = cfg["quantization_config"]["format"] = "gptq"
    (relabelled / "config.json").write_text(json.dumps(cfg))
    rc, err = run_cli(capsys, "merge", relabelled, world["adapter"], "-o", tmp_path / "o")
    assert rc == 2 and "fingerprint" in err, err


# ------------------------------------------------------------------------------ rank, group size


def test_rank_in_config_disagreeing_with_tensors_is_refused(world, capsys, tmp_path):
    bad = copy_with(world["adapter"], tmp_path / "rank", {"adapter_config.json": {"r": 4}})
    rc, err = run_cli(capsys, "merge", world["base"], bad, "-o", tmp_path / "o")
    assert rc == 2 and "rank r=4" in err, err


def test_rank_smaller_than_tensors_is_refused(world, capsys, tmp_path):
    """The config's r decides the scale alpha / r, so it must match A and B exactly."""
    bad = copy_with(world["adapter"], tmp_path / "rank", {"adapter_config.json": {"r": 1}})
    rc, err = run_cli(capsys, "merge", world["base"], bad, "-o", tmp_path / "o")
    assert rc == 2 and "rank r=1" in err, err


def test_adapter_pooled_over_finer_groups_is_refused(world, capsys, tmp_path):
    """An adapter trained on a group-16 base, its fingerprint removed (as in PEFT or official
    checkpoints), on the group-32 base: pooling groups are not unions of quantization groups."""
    anon = copy_with(world["adapter16"], tmp_path / "anon", {"qalora_export.json": {"base_fingerprint": None}})
    rc, err = run_cli(capsys, "merge", world["base"], anon, "-o", tmp_path / "o")
    assert rc == 2 and "group" in err, err
    assert not (tmp_path / "o").exists()


def test_adapter_group_size_record_disagreeing_with_shapes_is_refused(world, capsys, tmp_path):
    bad = copy_with(world["adapter"], tmp_path / "gs", {"qalora_export.json": {"pool_group_size": 16,
                                                                                 "base_fingerprint": None}})
    rc, err = run_cli(capsys, "merge", world["base"], bad, "-o", tmp_path / "o")
    assert rc == 2 and "pooling group size is 32" in err and "records 16" in err, err


def test_adapter_with_fingerprint_on_other_group_size_is_refused(world, capsys, tmp_path):
    rc, err = run_cli(capsys, "merge", world["base"], world["adapter16"], "-o", tmp_path / "o")
    assert rc == 2 and "fingerprint" in err, err


# ------------------------------------------------------------------------------ tokenizer


@pytest.fixture(scope="module")
def foreign_tokenizer_base(world) -> Path:
    """The base with a tokenizer of 400 tokens; its embedding has 320 rows."""
    d = copy_with(world["base"], world["root"] / "foreign-tok")
    gguf_helpers.make_tiny_bpe_tokenizer(d, vocab_size=400)
    return d


@pytest.mark.parametrize("verb", ["onnx", "gguf", "train", "verify"])
def test_tokenizer_of_another_model_is_refused(world, foreign_tokenizer_base, capsys, tmp_path, verb):
    base = foreign_tokenizer_base
    if verb == "train":
        argv = ["train", base, "--data", world["data"], "-o", tmp_path / "o", "--steps", "1", "--rank", "2"]
    elif verb == "verify":
        merged = tmp_path / "merged"
        assert run_cli(capsys, "merge", world["base"], world["adapter"], "-o", merged)[0] == 0
        argv = ["verify", merged, "--base", base, "--adapter", world["adapter"]]
    else:
        argv = [verb, base, world["adapter"], "-o", tmp_path / ("o.gguf" if verb == "gguf" else "o")]
    rc, err = run_cli(capsys, *argv)
    assert rc == 2 and "token ids up to" in err and "belongs to another model" in err, err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.gguf").exists()


def test_config_vocab_size_disagreeing_with_embedding_is_refused(world, capsys, tmp_path):
    base = copy_with(world["base"], tmp_path / "vocab", {"config.json": {"vocab_size": 256}})
    rc, err = run_cli(capsys, "onnx", base, world["adapter"], "-o", tmp_path / "o")
    assert rc == 2 and "vocab_size is 256" in err and "320 rows" in err, err


def test_matching_tokenizer_passes_the_check(world, capsys, tmp_path):
    rc, err = run_cli(capsys, "onnx", world["base"], world["adapter"], "-o", tmp_path / "o")
    assert rc == 0, err
