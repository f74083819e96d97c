"""Test helpers for the GGUF converter: a tiny byte-level BPE tokenizer and bases that carry it.

llama.cpp can only load a GGUF whose tokenizer it re-implements, and the tiny models of
``tiny_models`` have a WordLevel tokenizer (which GGUF cannot express), so GGUF tests put a tiny
GPT-2 style BPE tokenizer, trained here on generated text, into the base directory.
"""

from __future__ import annotations

from pathlib import Path

import tiny_models

BPE_VOCAB = 320  # 256 byte tokens + 4 specials + merges
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt")


def training_text() -> list[str]:
    """Deterministic English-like lines with digits, punctuation and newlines."""
    words = ("the quick brown fox jumps over lazy dog model weight group scale zero point adapter "
             "quantize merge export llama token layer block value code it's we'll they're").split()
    lines = []
    for i in range(400):
        picked = [words[(i * 7 + j * 3) % len(words)] for j in range(6 + i % 5)]
        lines.append(" ".join(picked) + f" {i * 37 % 1000}, x{i % 9}!\n")
    return lines


def make_tiny_bpe_tokenizer(out_dir: Path, vocab_size: int = BPE_VOCAB, pre: str = "smollm") -> Path:
    """Write a byte-level BPE fast tokenizer (``pre``: "smollm" splits digits first, "gpt-2" does not)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre == "gpt-2":
        tok.pre_tokenizer = byte_level
    else:
        raise ValueError(pre)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(training_text(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<|endoftext|>", bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    out_dir = Path(out_dir)
    for name in TOKENIZER_FILES:
        (out_dir / name).unlink(missing_ok=True)
    fast.save_pretrained(str(out_dir))
    return out_dir


def make_bpe_base(out_dir: Path, pre: str = "smollm", **kwargs) -> Path:
    """``tiny_models.make_tiny_base`` with a BPE tokenizer (vocab ``BPE_VOCAB``) instead of WordLevel."""
    kwargs.setdefault("vocab", BPE_VOCAB)
    base = tiny_models.make_tiny_base(out_dir, **kwargs)
    make_tiny_bpe_tokenizer(base, vocab_size=kwargs["vocab"], pre=pre)
    return base


# ------------------------------------------------------------------------- llama.cpp's own converter


def convert_with_llama_cpp(float_dir: Path, out: Path, vocab_only: bool = True) -> Path:
    """``convert_hf_to_gguf.py`` of the llama-cpp-python sdist on a float Hugging Face directory, in a
    child process with the sdist's own ``gguf-py`` (``--vocab-only``: the metadata, hyperparameters
    included, without tensors; ``--outtype f16`` otherwise)."""
    import os
    import subprocess
    import sys

    from qalora_export.fixtures.llama_cpp_source import llama_cpp_source_dir

    src = llama_cpp_source_dir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src / "gguf-py"), os.environ.get("PYTHONPATH", "")]))
    mode = ["--vocab-only"] if vocab_only else ["--outtype", "f16"]
    proc = subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(float_dir), "--outfile", str(out),
                           *mode], env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not Path(out).is_file():
        raise RuntimeError(f"convert_hf_to_gguf.py failed on {float_dir}: {proc.stderr[-3000:]}")
    return Path(out)


def gguf_metadata(path: Path) -> dict:
    """Every metadata key of a GGUF file -> (value type name, value), as gguf-py reads them (the
    ``GGUF.*`` header pseudo-fields left out)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return {key: (field.types[0].name if field.types else None, field.contents())
            for key, field in reader.fields.items() if not key.startswith("GGUF.")}


def llama_cpp_vocab_tests(name: str) -> tuple[list[str], list[list[int]]]:
    """llama.cpp's tokenizer test cases for ``models/ggml-vocab-<name>.gguf``: the ``.inp`` texts
    (split at the ``__ggml_vocab_test__`` lines as its test-tokenizer-0 splits them) and the token
    ids llama.cpp expects for each (``.out``)."""
    from qalora_export.fixtures.llama_cpp_source import llama_cpp_source_dir

    models = llama_cpp_source_dir() / "models"
    raw = (models / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8")
    sep, texts, pos = "\n__ggml_vocab_test__\n", [], 0
    while pos < len(raw):
        end = raw.find(sep, pos)
        if end < 0:
            texts.append(raw[pos:])
            break
        texts.append(raw[pos:end])
        pos = end + len(sep)
    expected = [[int(t) for t in line.split()]
                for line in (models / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8").splitlines()]
    if len(texts) != len(expected):
        raise ValueError(f"ggml-vocab-{name}: {len(texts)} test texts but {len(expected)} expected tokenizations")
    return texts, expected
