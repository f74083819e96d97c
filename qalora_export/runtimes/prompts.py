"""Token-id prompts checked before a runtime sees them: native runtimes (llama.cpp, MLX) read out of
bounds or crash on ids outside the vocabulary instead of raising."""

from __future__ import annotations

from collections.abc import Sequence

from qalora_export.errors import ConfigError


def check_prompt_ids(prompt: Sequence[int], n_vocab: int, where: str) -> list[int]:
    """``prompt`` as a list of ints; ConfigError when it is empty or an id is outside ``[0, n_vocab)``."""
    ids = [int(t) for t in prompt]
    if not ids:
        raise ConfigError(f"{where}: empty prompt; give at least one token id")
    bad = [t for t in ids if t < 0 or t >= n_vocab]
    if bad:
        raise ConfigError(f"{where}: token id {bad[0]} is outside the model's vocabulary of {n_vocab}")
    return ids
