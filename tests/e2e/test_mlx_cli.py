"""The ``mlx`` verb end to end: ``qalora-export mlx`` (export, verify in mlx-lm, handoff bundle) and
``merge --to mlx`` write directories that ``verify`` without a base passes and ``inspect`` describes; and the SmolLM2 fixture (4-bit, g32) as
an MLX model verified in mlx-lm against the unmerged model.
"""

from __future__ import annotations

import json

import pytest
import tiny_models

from qalora_export.cli import EXIT_OK, main

pytest.importorskip("mlx_lm")


def test_mlx_verb_merge_verify_and_inspect(tmp_path, capsys):
    base = tiny_models.make_tiny_base(tmp_path / "base", bits=4, group_size=32)
    adapter = tiny_models.make_random_adapter(base, tmp_path / "adapter", magnitude=0.3)
    log = ["--log-file", str(tmp_path / "log.txt")]
    out = tmp_path / "merged-mlx"
    assert main(["mlx", str(base), str(adapter), "-o", str(out)] + log) == EXIT_OK
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert json.loads((out / "config.json").read_text())["quantization"] == {"group_size": 32, "bits": 4,
                                                                            "mode": "affine"}
    half = tmp_path / "merged-mlx16"
    assert main(["merge", str(base), str(adapter), "--to", "mlx", "--mlx-dtype", "float16", "--no-verify",
                 "-o", str(half)] + log) == 0
    assert json.loads((half / "config.json").read_text())["qalora_export"]["exact"] is False
    # the export ran verify's runtime level into its handoff bundle; verify without a base re-runs mlx-lm
    # against the stored reference (runtime_outputs + the handoff gate)
    report = tmp_path / "verify.json"
    assert main(["verify", str(out), "--report", str(report)] + log) == 0, report.read_text()
    assert json.loads(report.read_text())["passed"]
    capsys.readouterr()
    assert main(["inspect", str(out)] + log) == EXIT_OK
    assert '"kind": "mlx"' in capsys.readouterr().out


@pytest.mark.slow  # ~4 min on 2 cores (measured 243 s after the shared base): the weight level over 30 layers
def test_smollm2_fixture_as_mlx_verifies_in_mlx_lm(smollm2_base, tmp_path):
    """The real model (30 layers, GQA, rope_theta 100000 nested by transformers 5, tied embeddings)."""
    from qalora_export.checkpoint.merged_view import MergedView
    from qalora_export.formats import get_format
    from qalora_export.verify import verify_artifact

    adapter = tiny_models.make_random_adapter(smollm2_base, tmp_path / "adapter", rank=8, alpha=16.0, seed=7)
    out = tmp_path / "smollm2-mlx"
    summary = get_format("mlx").export(MergedView.open(smollm2_base, adapter), out)
    config = json.loads((out / "config.json").read_text())
    assert summary["exact"] and config["rope_theta"] == 100000.0 and config["tie_word_embeddings"] is True
    report = verify_artifact(out, smollm2_base, adapter)
    assert report["weights"]["passed"], report["weights"]["max_abs_vs_declared"]
    runtime = report["runtime"]
    assert runtime["passed"], runtime["artifact"]["checks"]
    assert runtime["artifact"]["top1_agreement"] == 1.0
