"""Does a tokenizer belong to a model? A cheap check before training, exporting or verifying.

A tokenizer from another model produces token ids the embedding does not have (an index error
deep inside a runtime, or silently wrong text where the ids happen to fit). The check reads
``tokenizer.json`` (the fast tokenizer every supported model ships; without one there is nothing
cheap to check, and nothing is refused) and the embedding's shape from the checkpoint header:

- ``config.json`` ``vocab_size`` must equal the rows of ``model.embed_tokens.weight``;
- the largest token id of the tokenizer (vocabulary plus added tokens) must be below that number
  of rows. Fewer tokens than rows is normal (embeddings padded to a multiple of 64 or 128).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from qalora_export.checkpoint.gptq import GPTQCheckpoint
from qalora_export.errors import CheckpointError

EMBEDDING = "model.embed_tokens.weight"
TOKENIZER_JSON = "tokenizer.json"


def tokenizer_max_id(directory: Path | str) -> Optional[int]:
    """Largest token id of ``directory/tokenizer.json`` (vocab and added tokens); None without one."""
    path = Path(directory) / TOKENIZER_JSON
    if not path.is_file():
        return None
    try:
        tok = json.loads(path.read_bytes().decode("utf-8"))
        vocab = (tok.get("model") or {}).get("vocab") or {}
        ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))  # Unigram: a list
        ids += [added["id"] for added in tok.get("added_tokens") or []]
        return max((int(i) for i in ids), default=None)
    except (OSError, ValueError, RecursionError, TypeError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"{path} is not a readable tokenizer ({type(exc).__name__}: {exc})") from exc


def check_tokenizer_matches(base: GPTQCheckpoint, tokenizer_dir: Path | str | None = None) -> None:
    """Raise :class:`CheckpointError` when ``tokenizer_dir`` (default: the base directory) holds a
    tokenizer whose ids do not fit the base's embedding, or config and embedding disagree."""
    tokenizer_dir = Path(tokenizer_dir or base.directory)
    if EMBEDDING not in base.tensor_files:
        return
    rows = base.tensor_spec(EMBEDDING)[1][0]
    vocab_size = base.model_config.get("vocab_size")
    if isinstance(vocab_size, int) and vocab_size != rows:
        raise CheckpointError(
            f"{base.directory / 'config.json'}: vocab_size is {vocab_size} but {EMBEDDING} has {rows} rows; "
            f"config.json belongs to another model (or the weights were resized without updating it)")
    max_id = tokenizer_max_id(tokenizer_dir)
    if max_id is not None and max_id >= rows:
        raise CheckpointError(
            f"the tokenizer in {tokenizer_dir} has token ids up to {max_id}, but the model's embedding has "
            f"{rows} rows: the tokenizer belongs to another model. Copy the tokenizer files of the model "
            f"the base was quantized from into {tokenizer_dir}")
