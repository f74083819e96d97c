"""What the handoff bundle (docs/design.md §11) says about a GGUF file, and the file's outputs in
llama.cpp for ``verify`` without a base. The gate is the runtime level's: mean KL <= KL_FLOOR_FACTOR x
the floor measured at export (the base exported the same way, in llama.cpp) + KL_EPSILON.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import numpy as np

from qalora_export.formats.bundle_facts import floor_limit, versions
from qalora_export.formats.gguf import spec as spec
from qalora_export.formats.protocol import Handoff

GREEDY_NOTE = "greedy continuations are reported, not gated: llama.cpp quantizes activations (near-ties flip)"


def runtime_outputs(artifact: Path, prompts: list[list[int]], n_new: int,
                    workdir: Path) -> tuple[list[np.ndarray], list[list[int]]]:
    """llama.cpp's logits ``[T, V]`` and ``n_new`` greedy tokens per prompt (in a child process)."""
    from qalora_export.formats.gguf.runtime import run_logits_and_greedy

    return run_logits_and_greedy(artifact, prompts, n_new)


def tokenizer_fingerprint(artifact: Path) -> str:
    """sha256 of the file's ``tokenizer.ggml.model``, ``.pre`` and ``.tokens`` (the values gguf-py reads,
    decoded by ``container.read_header``: gguf-py's reader takes seconds on a 150k-token vocabulary)."""
    from qalora_export.formats.gguf.container import read_header

    metadata, _ = read_header(artifact)
    parts = {}
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens"):
        parts[key] = metadata[key][1] if key in metadata else None
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()


def handoff(artifact: Path, runtime_report: Optional[dict]) -> Handoff:
    name = Path(artifact).name
    floor = (runtime_report or {}).get("floor")
    snippet = (
        "llama.cpp's command line (any recent build):\n\n"
        "```bash\n"
        f"llama-cli -m {name} -p \"What is the capital of France?\" -n 32 --temp 0 -no-cnv\n"
        "```\n\n"
        "llama-cpp-python (`pip install 'qalora-export[llamacpp]'`):\n\n"
        "```python\n"
        "from llama_cpp import Llama\n\n"
        f"llm = Llama(\"{name}\", n_ctx=512, verbose=False)\n"
        "reply = llm.create_chat_completion(messages=[{\"role\": \"user\", \"content\": \"What is the capital of "
        "France?\"}], temperature=0, max_tokens=32)\n"
        "print(reply[\"choices\"][0][\"message\"][\"content\"])\n"
        "```\n")
    return Handoff(
        runtime="llama.cpp (" + versions("llama-cpp-python") + ")",
        install="pip install 'qalora-export[llamacpp]'",
        snippet=snippet,
        limits=("Q4_1 blocks (d = scale, m = -scale * zero'): 2/3/4-bit codes, group size a multiple of 32, "
                "no act-order; the folded zero-points are held exactly up to the fp16 rounding of m",
                "llama.cpp quantizes activations, so its logits differ from PyTorch's by a floor measured at "
                "export (the base exported the same way); near-tie top-1 flips are expected",
                *_embedding_limits(artifact, runtime_report),
                GREEDY_NOTE),
        gate={"mean_kl": floor_limit(floor, "mean_kl", spec.KL_FLOOR_FACTOR, spec.KL_EPSILON)},
        near_tie_factor=0.0,
        tokenizer_fingerprint=tokenizer_fingerprint(artifact),
    )


def _embedding_limits(artifact: Path, runtime_report: Optional[dict]) -> tuple[str, ...]:
    """A line saying so when the token embedding / output head were requantized (``--embeddings q8_0|q6_k``)."""
    embeddings = (runtime_report or {}).get("embeddings")
    if embeddings is None:
        try:
            from qalora_export.formats.gguf.read import read_file_types

            embeddings = read_file_types(artifact)[1]
        except Exception:  # noqa: BLE001 - a damaged file fails the bundle's other checks
            return ()
    if embeddings not in spec.REQUANTIZED_EMBEDDINGS:
        return ()
    return (f"token_embd (and output, when untied) requantized to {embeddings.upper()} from the checkpoint's "
            f"float table (--embeddings {embeddings}): not exact; the floor is the base exported with the same "
            f"types, so the gate judges the fold, not the requantized head",)
