"""Split GGUF output (``--split-max-size``), as llama.cpp's gguf-split lays it out.

A tiny model split into several files: the names, the ``split.*`` keys in every file, the
metadata in the first only, the same tensors as the single file; llama.cpp (llama-cpp-python)
loads it from the first file and computes the same logits as from the single file; verify's
reader reads every split; a model that fits is the same single file; existing split files are
refused without --overwrite, and nothing is written then.
"""

from __future__ import annotations

from pathlib import Path

import gguf_helpers
import numpy as np
import pytest
import tiny_models

from qalora_export.checkpoint.merged_view import MergedView
from qalora_export.cli import EXIT_OK, main
from qalora_export.errors import CheckpointError, OutputExistsError
from qalora_export.formats.gguf import FORMAT as G
from qalora_export.formats.gguf import container
from qalora_export.formats.gguf import read as gguf_read
from qalora_export.formats.gguf import runtime as llamacpp
from qalora_export.verify import weight_report

SPLIT_BYTES = 16 << 10  # the tiny model's tensors take about 80 KiB: several files
PROMPTS = [[1, 40, 77, 100, 200, 30, 31, 250], [10, 20, 30, 40, 50, 60, 70, 80, 90, 300, 5]]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("gguf-split")
    base = gguf_helpers.make_bpe_base(root / "base")
    return base, tiny_models.make_random_adapter(base, root / "adapter")


@pytest.fixture(scope="module")
def exports(model_dirs, tmp_path_factory) -> dict:
    base, adapter = model_dirs
    out = tmp_path_factory.mktemp("gguf-split-out")
    single = G.export(MergedView.open(base, adapter), out / "single" / "model.gguf")
    split = G.export(MergedView.open(base, adapter), out / "split" / "model.gguf", split_max_bytes=SPLIT_BYTES)
    return {"single": single, "split": split, "dir": out}


def _reader(path):
    from gguf import GGUFReader
    return GGUFReader(str(path))


def test_files_are_named_and_keyed_like_gguf_split(exports):
    files = [Path(f) for f in exports["split"]["files"]]
    count = len(files)
    assert count >= 3
    assert [f.name for f in files] == [f"model-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]
    assert sorted(p.name for p in files[0].parent.iterdir()) == sorted(f.name for f in files)  # nothing else left
    assert not (files[0].parent / "model.gguf").exists()
    total_tensors = sum(len(_reader(f).tensors) for f in files)
    assert total_tensors == exports["single"]["tensors"] == exports["split"]["tensors"]
    for i, f in enumerate(files):
        r = _reader(f)
        fields = {k: v.contents() for k, v in r.fields.items() if k.startswith("split.")}
        assert fields == {container.KEY_SPLIT_NO: i, container.KEY_SPLIT_COUNT: count, container.KEY_SPLIT_TENSORS_COUNT: total_tensors}
        assert ("tokenizer.ggml.tokens" in r.fields) == (i == 0)  # the metadata is in the first file only
        assert sum(t.n_bytes for t in r.tensors) <= SPLIT_BYTES or len(r.tensors) == 1
    assert exports["split"]["bytes"] == sum(f.stat().st_size for f in files)


def test_split_tensors_equal_the_single_file(exports, model_dirs):
    single = {t.name: np.asarray(t.data).tobytes() for t in _reader(exports["single"]["path"]).tensors}
    split = {t.name: np.asarray(t.data).tobytes() for f in exports["split"]["files"] for t in _reader(f).tensors}
    assert split == single
    first = exports["split"]["files"][0]
    decoded = dict(G.read_weights(first))  # verify's reader follows the splits
    assert decoded.keys() == dict(G.read_weights(exports["single"]["path"])).keys()
    base, adapter = model_dirs
    report = weight_report(MergedView.open(base, adapter), G, Path(first))
    assert report["passed"] and not report["missing_layers"] and report["layers_checked"] == 14
    assert gguf_read.read_file_types(first) == gguf_read.read_file_types(exports["single"]["path"])


def test_llama_cpp_loads_the_split_model_from_its_first_file(exports):
    single = llamacpp.run_logits(exports["single"]["path"], PROMPTS)
    split = llamacpp.run_logits(exports["split"]["files"][0], PROMPTS)
    for a, b in zip(single, split):
        np.testing.assert_array_equal(a, b)


def test_a_model_that_fits_is_one_plain_file(exports, model_dirs):
    base, adapter = model_dirs
    out = exports["dir"] / "fits" / "model.gguf"
    summary = G.export(MergedView.open(base, adapter), out, split_max_bytes=1 << 30)
    assert summary["files"] == [str(out)] and list(out.parent.iterdir()) == [out]
    assert out.read_bytes() == Path(exports["single"]["path"]).read_bytes()


def test_existing_split_files_are_refused_and_nothing_is_written(model_dirs, tmp_path):
    base, adapter = model_dirs
    out = tmp_path / "model.gguf"
    first = G.export(MergedView.open(base, adapter), out, split_max_bytes=SPLIT_BYTES)["files"]
    second = Path(first[1])
    second.write_bytes(b"keep me")
    for f in first[:1] + first[2:]:
        Path(f).unlink()
    with pytest.raises(OutputExistsError, match="--overwrite"):
        G.export(MergedView.open(base, adapter), out, split_max_bytes=SPLIT_BYTES)
    assert sorted(p.name for p in tmp_path.iterdir()) == [second.name] and second.read_bytes() == b"keep me"
    G.export(MergedView.open(base, adapter), out, split_max_bytes=SPLIT_BYTES, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(Path(f).name for f in first)


def test_reading_a_later_split_file_names_the_first(exports):
    with pytest.raises(CheckpointError, match="pass its first file"):
        list(G.read_weights(exports["split"]["files"][1]))


def test_a_renamed_first_split_is_refused(exports, tmp_path):
    renamed = tmp_path / "renamed.gguf"
    renamed.write_bytes(Path(exports["split"]["files"][0]).read_bytes())
    with pytest.raises(CheckpointError, match="cannot be found"):
        list(G.read_weights(renamed))


def test_cli_split_max_size(model_dirs, tmp_path):
    base, adapter = model_dirs
    out = tmp_path / "cli.gguf"
    assert main(["merge", str(base), str(adapter), "--to", "gguf", "-o", str(out), "--split-max-size", "16KiB",
                 "--no-verify"]) == EXIT_OK
    names = sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".gguf")
    assert len(names) >= 3 and names[0] == f"cli-00001-of-{len(names):05d}.gguf"
    assert (tmp_path / (names[0] + ".bundle") / "SHA256SUMS").is_file()  # the bundle sits beside the first file
    assert main(["verify", str(tmp_path / names[0]), "--base", str(base), "--adapter", str(adapter),
                 "--weights-only"]) == EXIT_OK


def test_a_non_positive_split_size_is_refused(model_dirs, tmp_path):
    from qalora_export.errors import ConfigError

    base, adapter = model_dirs
    with pytest.raises(ConfigError, match="--split-max-size 0 must be a positive number of bytes"):
        G.export(MergedView.open(base, adapter), tmp_path / "m.gguf", split_max_bytes=0)
    assert list(tmp_path.iterdir()) == []
