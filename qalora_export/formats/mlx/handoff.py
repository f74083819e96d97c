"""What the handoff bundle (docs/design.md §11) says about an MLX directory, and its outputs in mlx-lm for
``verify`` without a base: full-sequence logits and greedy decoding with mlx-lm's KV cache, on MLX's CPU
device. A float32 artifact is judged with the runtime level's fixed tolerances (``spec``), a
float16/bfloat16 one with the floor its export's runtime level measured.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qalora_export.formats.bundle_facts import directory_tokenizer_fingerprint, floor_limit, versions
from qalora_export.formats.mlx import spec
from qalora_export.formats.mlx.read import read_config
from qalora_export.formats.protocol import Handoff


def runtime_outputs(artifact: Path, prompts: list[list[int]], n_new: int,
                    workdir: Path) -> tuple[list[np.ndarray], list[list[int]]]:
    """mlx-lm's logits ``[T, V]`` and ``n_new`` greedy tokens per prompt (in a child process)."""
    from qalora_export.formats.mlx.runtime import run_logits_and_greedy

    return run_logits_and_greedy(artifact, prompts, n_new)


def handoff(artifact: Path, runtime_report: dict | None) -> Handoff:
    name = Path(artifact).name
    dtype = read_config(artifact).get("dtype", spec.DEFAULT_DTYPE)
    snippet = (
        "mlx-lm (`pip install 'qalora-export[mlx]'`, or `pip install mlx-lm` on a Mac):\n\n"
        "```bash\n"
        f"mlx_lm.generate --model {name} --prompt \"What is the capital of France?\" --max-tokens 32 --temp 0\n"
        "```\n\n"
        "```python\n"
        "from mlx_lm import load, generate\n\n"
        f"model, tokenizer = load(\"{name}\")\n"
        "prompt = tokenizer.apply_chat_template([{\"role\": \"user\", \"content\": \"What is the capital of "
        "France?\"}], add_generation_prompt=True)\n"
        "print(generate(model, tokenizer, prompt=prompt, max_tokens=32))\n"
        "```\n")
    limits = [("MLX affine quantization (weight = scales * q + biases, biases = -scale * zero'): 2/3/4/5/6/8-bit "
               "codes, group sizes 32/64/128, no act-order; the codes are the base's, unchanged"),
              ("config.json states rope_theta, rope_scaling, tie_word_embeddings and head_dim at the top level, as "
              "mlx-lm reads them (transformers 5 nests rope_theta under rope_parameters)")]
    if dtype == "float32":
        limits.append("float32 scales and biases hold the fold exactly (one rounding of -scale * zero' to float32)")
        gate = {"max_abs_logit_diff_rel": {"max": spec.RUNTIME_MAX_DLOGIT_REL},
                "mean_kl": {"max": spec.RUNTIME_MAX_KL},
                "top1_not_near_tie": {"max": 0},
                "greedy_not_near_tie": {"max": 0}}
        near_tie = spec.NEAR_TIE_FACTOR
    else:
        limits.append(f"{dtype} biases round the folded zero-points (recorded in config.json); MLX computes in "
                      f"{dtype}, so logits are judged against the floor measured at export")
        gate = {"mean_kl": floor_limit((runtime_report or {}).get("floor"), "mean_kl", spec.KL_FLOOR_FACTOR,
                                       spec.KL_EPSILON)}
        near_tie = 0.0
    return Handoff(
        runtime="mlx-lm (" + versions("mlx", "mlx-lm") + ")",
        install="pip install 'qalora-export[mlx]'",
        snippet=snippet,
        limits=tuple(limits),
        gate=gate,
        near_tie_factor=near_tie,
        tokenizer_fingerprint=directory_tokenizer_fingerprint(Path(artifact)),
    )
