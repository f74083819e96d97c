"""Tiny random LLaMA models, GPTQ bases and adapters for tests (seconds to build, no network).

Plain functions, importable from any test as ``import tiny_models``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qalora_export.core.adapter import AdapterLayer, QALoRAAdapter
from qalora_export.checkpoint.adapter_files import save_adapter
from qalora_export.checkpoint.gptq_writer import CheckpointWriter, write_configs
from qalora_export.checkpoint.gptq import GPTQCheckpoint
from qalora_export.checkpoint.gptq_config import GPTQConfig, zero_range
from qalora_export.checkpoint.gptq_codec import encode_layer
from qalora_export.storage.atomic import atomic_output_dir
from qalora_export.core.record import quantize_rtn

TINY_VOCAB = 128


def make_tokenizer(out_dir: Path, vocab: int = TINY_VOCAB) -> None:
    """A WordLevel fast tokenizer over tokens ``w0 .. w{vocab-1}`` with a ChatML-like template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<|im_start|>", "<|im_end|>", "<pad>"]
    words = {tok: i for i, tok in enumerate(specials)}
    for i in range(len(specials), vocab):
        words[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<pad>")
    fast.chat_template = (
        "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
        "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
    )
    fast.save_pretrained(str(out_dir))


def make_tiny_llama(out_dir: Path, seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4,
                    kv_heads: int = 2, intermediate: int = 128, vocab: int = TINY_VOCAB,
                    tie_embeddings: bool = False) -> Path:
    """A float LLaMA directory (config.json, model.safetensors, tokenizer) with random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                         max_position_embeddings=256, tie_word_embeddings=tie_embeddings,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger than the default init so that logits are not all flat
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.08)
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir))
    make_tokenizer(out_dir, vocab)
    return out_dir


def make_tiny_base(out_dir: Path, bits: int = 4, group_size: int = 32, act_order: bool = False,
                   checkpoint_format: str = "gptq_v2", seed: int = 0, **llama_kwargs) -> Path:
    """A GPTQ base from a tiny random LLaMA by min-max RTN; act-order bases get a random g_idx."""
    float_dir = Path(str(out_dir) + "-float")
    if not float_dir.exists():
        make_tiny_llama(float_dir, seed=seed, **llama_kwargs)
    if not act_order:
        from qalora_export.quantization.quantize import quantize_model

        quantize_model(float_dir, out_dir, bits, group_size, checkpoint_format)
        return Path(out_dir)
    from safetensors import safe_open

    gen = torch.Generator().manual_seed(seed + 1)
    config = json.loads((float_dir / "config.json").read_text())
    with atomic_output_dir(Path(out_dir)) as tmp, safe_open(str(float_dir / "model.safetensors"), "pt") as f:
        writer = CheckpointWriter(tmp)
        for name in sorted(f.keys()):
            t = f.get_tensor(name)
            if name.endswith("_proj.weight"):
                module = name[: -len(".weight")]
                in_features = t.shape[1]
                g_idx = (torch.arange(in_features) // group_size)[torch.randperm(in_features, generator=gen)]
                layer = quantize_rtn(module, t, bits, group_size, g_idx=g_idx,
                                     min_zero=zero_range(bits, checkpoint_format)[0])
                for suffix, packed in encode_layer(layer, checkpoint_format).items():
                    writer.add_tensor(f"{module}.{suffix}", packed)
            else:
                writer.add_tensor(name, t.to(torch.float16))
        writer.finish()
        write_configs(tmp, config, GPTQConfig(bits, group_size, True, False, checkpoint_format))
        make_tokenizer(tmp, config["vocab_size"])
    return Path(out_dir)


def make_random_adapter(base_dir: Path, out_dir: Path, rank: int = 4, alpha: float = 8.0, seed: int = 0,
                        integral_shift: bool = False, pooling: str = "peft",
                        pool_groups: str = "quantization", magnitude: float = 0.05) -> Path:
    """A random QA-LoRA adapter on every quantized layer of ``base_dir``.

    With ``integral_shift`` the factors are chosen so that every folded zero-point moves by a whole
    number of code units (the shift ``D / scale`` is an integer in {-1, 0, 1}): A = identity-like
    selections, B = integer * scale / (s * k), requiring rank >= number of groups.
    """
    from qalora_export.core.adapter import pooling_factor

    ckpt = GPTQCheckpoint(base_dir)
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for name in ckpt.quantized_modules:
        rec = ckpt.read_layer(name)
        G, out = rec.num_groups, rec.out_features
        if integral_shift:
            k = pooling_factor(pooling, rec.in_features, rec.in_features // G)
            s = alpha / rank
            if rank < G:
                raise ValueError(f"integral_shift needs rank >= groups ({G}) for {name}")
            shift = torch.randint(-1, 2, (G, out), generator=gen).to(torch.float64)  # [G, out]
            lo = zero_range(rec.bits, ckpt.config.checkpoint_format)[0]
            moved = rec.zeros - shift
            shift = torch.where((moved < lo) | (moved > (1 << rec.bits) - 1), 0.0, shift)  # stay in range
            a = torch.eye(rank, G, dtype=torch.float64)  # [r, L]: B @ A = B[:, :G]
            b = torch.zeros(out, rank, dtype=torch.float64)
            # B @ A = shift * scale / (s k), so the fold moves each zero by exactly -shift
            b[:, :G] = (shift * rec.scales.to(torch.float64)).T / (s * k)
            layers[name] = AdapterLayer(lora_A=a.to(torch.float32), lora_B=b.to(torch.float32))
        else:
            a = torch.randn(rank, G, generator=gen) * magnitude
            b = torch.randn(out, rank, generator=gen) * magnitude
            layers[name] = AdapterLayer(lora_A=a, lora_B=b)
    adapter = QALoRAAdapter(layers=layers, rank=rank, alpha=alpha, pooling=pooling,
                            pool_group_size=ckpt.config.group_size, pool_groups=pool_groups,
                            base_fingerprint=ckpt.fingerprint())
    save_adapter(adapter, Path(out_dir), base_model_path=str(base_dir))
    return Path(out_dir)
