"""The handoff bundle (docs/design.md §11): what every export writes beside its model files so that
the receiving team knows what it got and can re-check it with the runtime alone.

Layout. A directory artifact (gptq, onnx) holds it in ``ARTIFACT/handoff/``; a single-file artifact
(gguf) gets the sibling directory ``NAME.gguf.bundle/`` (a split GGUF: beside its first file):

- ``README.md``: the model card (base, adapter, the fold, format limits, versions, how to run it);
- ``verify.json`` + ``verify.md``: the verification that ran at export;
- ``reference.safetensors``: the unmerged model's top-k logits and greedy tokens on the fixed prompts;
- ``SHA256SUMS``: every model and bundle file, paths relative to the bundle directory
  (``cd BUNDLE && sha256sum -c SHA256SUMS``).
"""

from __future__ import annotations

from pathlib import Path

BUNDLE_SUBDIR = "handoff"  # inside a directory artifact
BUNDLE_SUFFIX = ".bundle"  # appended to a single-file artifact's name
CARD, VERIFY_JSON, VERIFY_MD, REFERENCE, SUMS = "README.md", "verify.json", "verify.md", "reference.safetensors", "SHA256SUMS"


def bundle_dir(artifact: Path) -> Path:
    """Where the bundle of ``artifact`` lives (see the module docstring)."""
    artifact = Path(artifact)
    if artifact.is_dir():
        return artifact / BUNDLE_SUBDIR
    return artifact.with_name(artifact.name + BUNDLE_SUFFIX)
