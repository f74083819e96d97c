"""Running an MLX directory in mlx-lm (MLX's CPU device): logits for fixed token ids, greedy decoding.

Prompts are token ids, never text, so that mlx-lm and the PyTorch reference see exactly the same
input. ``mlx`` and ``mlx_lm`` are imported inside the functions, and each public function runs its
work in a child process (:mod:`qalora_export.runtimes.isolation`): a native crash or hang of MLX is a
:class:`~qalora_export.errors.RuntimeCrashError` naming mlx-lm, never the death of the caller.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qalora_export.errors import ConfigError
from qalora_export.runtimes.isolation import RuntimeInfo, call_isolated
from qalora_export.runtimes.prompts import check_prompt_ids

RUNTIME = RuntimeInfo(
    name="mlx-lm (MLX, CPU)",
    crash_hint=("reinstall the MLX extra: pip install 'qalora-export[mlx]' (mlx[cpu] >= 0.32 on Linux, mlx on "
                "macOS, mlx-lm >= 0.32); run with -v (or read the log file) for MLX's own messages"))
# A call that runs past this is a hang (the fixture's runs take seconds).
DEFAULT_TIMEOUT_S = 900.0


def run_logits_and_greedy(artifact: Path | str, prompts: list[list[int]], n_new: int,
                          timeout: float | None = None) -> tuple[list[np.ndarray], list[list[int]]]:
    """mlx-lm's logits and greedy continuations for token-id prompts, from the artifact alone
    (in a child process, on MLX's CPU device).

    Returns:
        (one float32 array ``[len(prompt), vocab]`` per prompt (position t predicts token t + 1),
        the ``n_new`` tokens mlx-lm generates by argmax after each prompt with its KV cache, as its
        ``generate`` decodes; no sampling, no stop at eos).

    Raises:
        ConfigError: an empty prompt or a token id outside the vocabulary.
        RuntimeCrashError: mlx-lm crashed, or ran past ``timeout`` seconds (default ``DEFAULT_TIMEOUT_S``).
    """
    logits, continuations = call_isolated(
        f"{__name__}:_logits_and_greedy_here",
        {"artifact": str(artifact), "prompts": [[int(t) for t in p] for p in prompts], "n_new": int(n_new)},
        RUNTIME, timeout=DEFAULT_TIMEOUT_S if timeout is None else timeout)
    return [np.asarray(x, dtype=np.float32) for x in logits], [list(map(int, c)) for c in continuations]


def load_mlx_model(artifact: Path | str):
    """``(model, config)`` of an MLX directory, loaded by mlx-lm unmodified, on MLX's CPU device."""
    import mlx.core as mx
    from mlx_lm.utils import load_model

    path = Path(artifact)
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path} is not an MLX model directory (no config.json)")
    mx.set_default_device(mx.cpu)
    return load_model(path)



def _logits_and_greedy_here(artifact: str, prompts: list[list[int]],
                            n_new: int) -> tuple[list[np.ndarray], list[list[int]]]:
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    model, config = load_mlx_model(artifact)
    n_vocab = int(config["vocab_size"])
    logits, continuations = [], []
    for k, prompt in enumerate(prompts):
        ids = check_prompt_ids(prompt, n_vocab, f"prompt {k}")
        full = model(mx.array([ids]))  # [1, T, V], no cache: every position at once
        logits.append(np.array(full[0].astype(mx.float32)))
        cache = make_prompt_cache(model)
        step = model(mx.array([ids]), cache=cache)
        generated: list[int] = []
        for _ in range(n_new):
            token = int(mx.argmax(step[0, -1]).item())
            generated.append(token)
            step = model(mx.array([[token]]), cache=cache)
        continuations.append(generated)
    return logits, continuations
