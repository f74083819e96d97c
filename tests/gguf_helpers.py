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


#: Files of a Hugging Face directory that the converter's metadata (``--vocab-only``) depends on.
CONVERTER_INPUTS = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer.model",
                    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                    "vocab.json", "merges.txt")


def convert_with_llama_cpp(float_dir: Path, out: Path, vocab_only: bool = True) -> Path:
    """``convert_hf_to_gguf.py`` of the llama-cpp-python sdist on a float Hugging Face directory, in a
    child process with the sdist's own ``gguf-py`` (``--vocab-only``: the metadata, hyperparameters
    included, without tensors; ``--outtype f16`` otherwise).

    A ``--vocab-only`` result is a function of the converter and of :data:`CONVERTER_INPUTS` alone, so
    it is kept in the fixture cache under the sha256 of both and reused (the conversion of a
    150k-token vocabulary takes about 10 s).
    """
    import hashlib
    import os
    import shutil
    import subprocess
    import sys

    from qalora_export.fixtures.llama_cpp_source import llama_cpp_source_dir
    from qalora_export.fixtures.smollm2 import cache_dir

    src = llama_cpp_source_dir()
    cached = None
    if vocab_only:
        digest = hashlib.sha256(str(src.name).encode())
        for name in CONVERTER_INPUTS:
            path = Path(float_dir) / name
            if path.is_file():
                digest.update(name.encode() + b"\0" + path.read_bytes())
        cached = cache_dir() / "llama.cpp-converted" / f"{digest.hexdigest()[:32]}.gguf"
        if cached.is_file():
            shutil.copyfile(cached, out)
            return Path(out)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src / "gguf-py"), os.environ.get("PYTHONPATH", "")]))
    mode = ["--vocab-only"] if vocab_only else ["--outtype", "f16"]
    proc = subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(float_dir), "--outfile", str(out),
                           *mode], env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not Path(out).is_file():
        raise RuntimeError(f"convert_hf_to_gguf.py failed on {float_dir}: {proc.stderr[-3000:]}")
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(cached.name + f".{os.getpid()}.tmp")
        shutil.copyfile(out, tmp)
        tmp.replace(cached)
    return Path(out)


def gguf_metadata(path: Path) -> dict:
    """Every metadata key of a GGUF file -> (value type, value): ``container.read_header``, which
    decodes what gguf-py's reader does (checked against it in tests/unit/formats/gguf), in a fraction
    of its time on a 150k-token vocabulary."""
    from qalora_export.formats.gguf.container import read_header

    return read_header(path)[0]


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


# ------------------------------------------------------------------- tiny bases of other architectures


def make_arch_base(out_dir: Path, model_type: str, seed: int = 0, tokenizer: str = "bpe", **config) -> Path:
    """A tiny 4-bit g32 RTN base of ``model_type`` (qwen2, qwen3, mistral, llama) with the tiny BPE
    tokenizer (``tokenizer="spm"``: the tiny SentencePiece model of :func:`write_tiny_spm`): hidden 64,
    2 layers, 4 heads / 2 kv heads, intermediate 128; ``config`` overrides config.json fields."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from qalora_export.quantization.quantize import quantize_model

    float_dir = Path(str(out_dir) + "-float")
    vocab = BPE_VOCAB if tokenizer == "bpe" else SPM_VOCAB
    fields = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=256, rms_norm_eps=1e-5,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    fields.update(config)
    cfg = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0, 0.08)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
            else:  # norms: away from 1 so that a dropped one shows
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model.save_pretrained(str(float_dir))
    if tokenizer == "bpe":
        make_tiny_bpe_tokenizer(float_dir, vocab_size=vocab, pre="gpt-2")
    else:
        write_tiny_spm(float_dir)
    quantize_model(float_dir, out_dir, 4, 32, "gptq_v2")
    return Path(out_dir)


SPM_WORDS = ("the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "model", "weight", "group", "scale")


def _spm_pieces() -> list[str]:
    """Every prefix of each word of :data:`SPM_WORDS`, with and without the ``▁`` space mark, shortest first."""
    pieces: set[str] = set()
    for word in SPM_WORDS:
        for text in ("\u2581" + word, word):
            pieces.update(text[:end] for end in range(1, len(text) + 1))
    return sorted(pieces, key=lambda p: (len(p), p))


SPM_VOCAB = 3 + 256 + len(_spm_pieces())  # <unk>, <s>, </s>, the byte pieces, the word pieces


def tiny_spm_proto(**overrides):
    """A tiny SentencePiece BPE ``ModelProto`` as Llama-2's is made: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2,
    the 256 byte pieces ``<0x00>``.., then pieces of :data:`SPM_WORDS` (with and without ``▁``) and
    their prefixes, scored so that longer pieces win; byte fallback, identity normalizer, dummy prefix.
    ``overrides``: ``"trainer_spec.<field>"`` / ``"normalizer_spec.<field>"`` -> value."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.trainer_spec.model_type = pb.TrainerSpec.BPE
    proto.trainer_spec.byte_fallback = True
    trainer = proto.trainer_spec
    trainer.unk_id, trainer.bos_id, trainer.eos_id, trainer.pad_id = 0, 1, 2, -1
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = True
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    for text, kind in (("<unk>", 2), ("<s>", 3), ("</s>", 3)):
        proto.pieces.add(piece=text, score=0.0, type=kind)
    for b in range(256):
        proto.pieces.add(piece=f"<0x{b:02X}>", score=0.0, type=6)
    pieces = _spm_pieces()
    for rank, text in enumerate(pieces):
        proto.pieces.add(piece=text, score=-float(len(pieces) - rank) if len(text) > 1 else -1e4 + rank, type=1)
    for key, value in overrides.items():
        part, field = key.split(".")
        setattr(getattr(proto, part), field, value)
    return proto


def write_tiny_spm(out_dir: Path, proto=None, config: dict | None = None) -> Path:
    """``tokenizer.model`` (:func:`tiny_spm_proto`) and a Llama-2 style ``tokenizer_config.json``."""
    import json

    out_dir = Path(out_dir)
    for name in TOKENIZER_FILES:
        (out_dir / name).unlink(missing_ok=True)
    (out_dir / "tokenizer.model").write_bytes((proto or tiny_spm_proto()).SerializeToString())
    cfg = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
           "pad_token": None, "add_bos_token": True, "add_eos_token": False, "legacy": True,
           "chat_template": "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"}
    cfg.update(config or {})
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    return out_dir
