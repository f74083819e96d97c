"""Export every format on the SmolLM2 fixture and hash what was written (the redesign's safety net).

``python tests/e2e/artifact_hashes.py --write`` records the hashes in ``artifact_hashes.json``;
``tests/e2e/test_artifacts_unchanged.py`` recomputes them and compares. A refactor that changes one
byte of any artifact fails there; a deliberate change of an artifact re-records them, and says why
in its commit message.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RECORD = HERE / "artifact_hashes.json"

# name -> (format, export options): every option that changes the bytes, at least once
CASES: dict[str, tuple[str, dict]] = {
    "gptq_v2": ("gptq", {}),
    "gptq_v1_rounded": ("gptq", {"checkpoint_format": "gptq", "max_shard_bytes": 40_000_000}),
    "onnx_float": ("onnx", {"zero_points": "float"}),
    "onnx_auto": ("onnx", {}),  # the default: zero_points "auto" (packed q/k/v and gate/up)
    "onnx_split": ("onnx", {"zero_points": "split"}),
    "onnx_uint8_rounded_fp16": ("onnx", {"zero_points": "uint8", "allow_rounding": True, "dtype": "fp16",
                                         "accuracy_level": 4}),
    "gguf_f16": ("gguf", {}),
    "gguf_q8_0_split": ("gguf", {"embeddings": "q8_0", "split_max_bytes": 40_000_000}),
    "mlx_fp32": ("mlx", {}),
    "mlx_fp16_sharded": ("mlx", {"dtype": "float16", "max_shard_bytes": 40_000_000}),
}

#: Cases exported through the handoff-bundle path (a directory and a split-file artifact).
BUNDLED_CASES = ("onnx_auto", "gguf_q8_0_split")


def tree_hashes(path: Path, workdir: Path) -> dict[str, str]:
    """``relative path -> sha256`` of every file under ``path`` (or of ``path`` itself, a file).

    Paths under ``workdir`` that a JSON file records (the adapter's ``base_model_name_or_path``)
    are hashed as ``<workdir>``: the bytes that depend on where the test ran are not the artifact's.
    A directory artifact's handoff bundle (``handoff/``: versions, paths, timings) is left out: only
    model files are compared (:func:`check_bundle_sums` ties the bundle to them).
    """
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.relative_to(path).parts[0] != "handoff"
                   ) if path.is_dir() else [path]
    root = path if path.is_dir() else path.parent
    hashes = {}
    for p in files:
        data = p.read_bytes()
        if p.suffix == ".json":
            data = data.replace(str(workdir).encode(), b"<workdir>")
        hashes[str(p.relative_to(root))] = hashlib.sha256(data).hexdigest()
    return hashes


def artifact_name(fmt: str, case: str) -> str:
    return f"{case}.gguf" if fmt == "gguf" else case


def export_all(base: Path, workdir: Path) -> dict[str, dict[str, str]]:
    """A seeded random adapter on ``base`` (rank 8), every case exported under ``workdir``; their hashes."""
    sys.path.insert(0, str(HERE.parent))
    import tiny_models  # noqa: E402  (tests/ helpers)

    from qalora_export.bundle.write import export_with_bundle
    from qalora_export.checkpoint.merged_view import MergedView
    from qalora_export.formats import get_format

    adapter = tiny_models.make_random_adapter(base, workdir / "adapter", rank=8, alpha=16.0, seed=7)
    hashes = {"adapter": tree_hashes(adapter, base.parent)}
    for case, (fmt, options) in CASES.items():
        out = workdir / artifact_name(fmt, case)
        if case in BUNDLED_CASES:
            # the CLI's export path: the format's files, verify's weight level and the handoff bundle
            export_with_bundle(fmt, base, adapter, out, options, runtime=False)
        else:  # the format alone (the bundle path calls the same export; its verify costs ~20 s a case)
            get_format(fmt).export(MergedView.open(base, adapter), out, **options)
        written = sorted(workdir.glob(f"{case}*.gguf")) if fmt == "gguf" else [out]
        hashes[case] = {k: v for p in written for k, v in tree_hashes(p, base.parent).items()}
        if case in BUNDLED_CASES:
            check_bundle_sums(written[0], hashes[case])
    return hashes


def check_bundle_sums(artifact: Path, hashes: dict[str, str]) -> None:
    """The bundle's SHA256SUMS lists exactly the model files, with the hashes computed here (JSON
    files that record a path excepted: those are hashed here with the path replaced)."""
    from qalora_export.bundle import SUMS, bundle_dir
    from qalora_export.bundle.checksums import read_sums

    bundle = bundle_dir(artifact)
    listed = {name.removeprefix("../"): digest for digest, name in read_sums(bundle / SUMS) if name.startswith("../")}
    assert set(listed) == set(hashes), (sorted(listed), sorted(hashes))
    for name, digest in listed.items():
        if not name.endswith(".json"):
            assert digest == hashes[name], f"{artifact}: SHA256SUMS disagrees on {name}"


def quantize_and_export_all(float_dir: Path, workdir: Path) -> dict[str, dict[str, str]]:
    """RTN w4 g32 gptq_v2 of ``float_dir`` (the fixture), then :func:`export_all` on it."""
    from qalora_export.quantization.quantize import quantize_model

    base = workdir / "base"
    quantize_model(float_dir, base, bits=4, group_size=32, checkpoint_format="gptq_v2")
    return {"base_rtn_w4g32": tree_hashes(base, workdir), **export_all(base, workdir / "out")}


def main() -> None:
    import tempfile

    from qalora_export.fixtures.smollm2 import smollm2_float_dir

    with tempfile.TemporaryDirectory() as tmp:
        hashes = quantize_and_export_all(smollm2_float_dir(), Path(tmp))
    text = json.dumps(hashes, indent=1, sort_keys=True) + "\n"
    if "--write" in sys.argv:
        RECORD.write_text(text)
        print(f"wrote {RECORD}")
    else:
        print(text)


if __name__ == "__main__":
    main()
