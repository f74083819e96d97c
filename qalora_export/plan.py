"""Planning a merge from ``config.json`` alone: tensor sizes, GPTQ shards, output sizes, memory.

Nothing is read but the model's shape, so a 70B conversion can be planned on any machine
(``benchmarks/bench_scale.py --dry-run``). Shapes follow the LLaMA family (q/k/v/o, gate/up/down
per layer; embeddings and norms fp16; ``lm_head`` fp16 and not quantized, as GPTQ checkpoints
ship it), tensors as :mod:`qalora_export.checkpoint.gptq` lays them out.

Memory model (every converter streams; see docs/scale.md): the peak is

    the format's process baseline + one layer's working set

with the working set a constant number of bytes per weight of the largest quantized linear
(:data:`BYTES_PER_WEIGHT`) or a multiple of the largest float tensor (embedding / lm-head table,
:data:`FLOAT_TENSOR_COPIES`), whichever is larger. The adapter is not in it: it is read one
layer's factors at a time. The constants are fitted to measured peaks (docs/scale.md): the
7B-shaped benchmark (8 and 32 layers) and a 70B-shaped checkpoint of 1 and 2 layers, which has
the 70B model's largest linear (28672x8192) and full-size tables; the peak does not grow with the
layer count, so an 80-layer plan uses the same figures.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch

from qalora_export.core.packing import packed_length
from qalora_export.storage.safetensors_stream import TensorSpec, plan_shards

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

# Fitted to the measured peaks (docs/scale.md: 7B-shaped at 8/32 layers, 70B-shaped at 1/2 layers),
# not derived: a process baseline (python, torch, numpy, safetensors and the format's imports:
# onnx and transformers' configuration code for ONNX; gguf-py and the writer threads' buffers for
# GGUF)
BASELINE_BYTES = {"gptq": 320 << 20, "onnx": 435 << 20, "gguf": 500 << 20}
# ... bytes per weight of the largest quantized linear while it is converted (gptq: the fingerprint
# check's one tensor, tensors are otherwise copied file to file; onnx: qweight, MatMulNBits B being
# laid out 1 MB at a time; gguf: qweight and its Q4_1 blocks, and the previous tensor's blocks
# still queued for the writer thread)
BYTES_PER_WEIGHT = {"gptq": 0.3, "onnx": 0.6, "gguf": 2.0}
FLOAT_TENSOR_COPIES = {"gptq": 0.0, "onnx": 1.05, "gguf": 0.0}

SHAPES = {  # config.json fields of the shapes the benchmark uses
    "llama-7b": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
                 "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
                 "hidden_act": "silu", "rope_theta": 10000.0, "architectures": ["LlamaForCausalLM"],
                 "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16"},
    "llama2-70b": {"model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                   "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 32000,
                   "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
                   "hidden_act": "silu", "rope_theta": 10000.0, "architectures": ["LlamaForCausalLM"],
                   "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16"},
}


def linear_shapes(config: dict) -> list[tuple[str, int, int]]:
    """(module, out, in) of every quantized projection, in layer order."""
    hidden, inter = int(config["hidden_size"]), int(config["intermediate_size"])
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    kv = int(config.get("num_key_value_heads") or heads) * head_dim
    shapes = {"self_attn.q_proj": (heads * head_dim, hidden), "self_attn.k_proj": (kv, hidden),
              "self_attn.v_proj": (kv, hidden), "self_attn.o_proj": (hidden, heads * head_dim),
              "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}
    return [(f"model.layers.{i}.{p}", *shapes[p]) for i in range(int(config["num_hidden_layers"])) for p in PROJECTIONS]


def checkpoint_tensors(config: dict, bits: int, group_size: int) -> list[TensorSpec]:
    """Every tensor of a GPTQ checkpoint of this shape (qweight/qzeros/scales/g_idx per projection;
    fp16 embeddings, norms and lm_head), in the order the GPTQ export writes them."""
    specs = []
    for name, out_f, in_f in linear_shapes(config):
        groups = in_f // group_size
        specs += [TensorSpec(f"{name}.qweight", torch.int32, (packed_length(in_f, bits), out_f)),
                  TensorSpec(f"{name}.qzeros", torch.int32, (groups, packed_length(out_f, bits))),
                  TensorSpec(f"{name}.scales", torch.float16, (groups, out_f)),
                  TensorSpec(f"{name}.g_idx", torch.int32, (in_f,))]
    hidden, vocab = int(config["hidden_size"]), int(config["vocab_size"])
    floats = [TensorSpec("model.embed_tokens.weight", torch.float16, (vocab, hidden)),
              TensorSpec("model.norm.weight", torch.float16, (hidden,))]
    if not config.get("tie_word_embeddings", False):
        floats.append(TensorSpec("lm_head.weight", torch.float16, (vocab, hidden)))
    for i in range(int(config["num_hidden_layers"])):
        floats += [TensorSpec(f"model.layers.{i}.input_layernorm.weight", torch.float16, (hidden,)),
                   TensorSpec(f"model.layers.{i}.post_attention_layernorm.weight", torch.float16, (hidden,))]
    return specs + sorted(floats, key=lambda s: s.name)


@dataclass
class MergePlan:
    """What merging an adapter into a checkpoint of this shape reads, writes and needs."""

    fmt: str
    layers: int
    quantized_linears: int
    input_bytes: int
    output_bytes: int
    adapter_bytes: int
    largest_linear: str  # "out x in"
    largest_float_tensor_bytes: int
    shards: Optional[list[int]]  # GPTQ: bytes of each output shard
    estimated_peak_bytes: int

    def to_json(self) -> dict:
        return asdict(self)


def output_bytes(config: dict, fmt: str, bits: int, group_size: int) -> int:
    """Approximate artifact size (tensor bytes) for ``fmt``: gptq = the input's layout; onnx = codes
    in MatMulNBits B (3-bit in a 4-bit container), fp32 scales and float zero-points per block;
    gguf = Q4_1 (20 bytes per 32 weights), fp16 embeddings."""
    specs = checkpoint_tensors(config, bits, group_size)
    floats = sum(s.nbytes for s in specs if not s.name.endswith(("qweight", "qzeros", "scales", "g_idx")))
    weights = sum(o * i for _, o, i in linear_shapes(config))
    if fmt == "gptq":
        return sum(s.nbytes for s in specs)
    if fmt == "onnx":
        container = 4 if bits == 3 else bits
        blocks = weights // min(group_size, 128)
        return weights * container // 8 + blocks * 8 + floats
    if fmt == "gguf":
        from qalora_export.formats.gguf.spec import Q4_1_BLOCK_BYTES, QK4_1

        return weights // QK4_1 * Q4_1_BLOCK_BYTES + floats
    raise ValueError(f"unknown format {fmt!r}")


def plan_merge(config: dict, fmt: str, bits: int = 4, group_size: int = 128, rank: int = 16,
               max_shard_bytes: int = 2 * 1024**3) -> MergePlan:
    """Plan ``merge --to fmt`` of a checkpoint with this ``config.json`` and a rank-``rank`` adapter."""
    specs = checkpoint_tensors(config, bits, group_size)
    linears = linear_shapes(config)
    adapter = sum(4 * rank * (in_f // group_size + out_f) for _, out_f, in_f in linears)
    _, big_out, big_in = max(linears, key=lambda x: x[1] * x[2])
    biggest_float = max(s.nbytes for s in specs if s.name.endswith(".weight"))
    working = max(BYTES_PER_WEIGHT[fmt] * big_out * big_in, FLOAT_TENSOR_COPIES[fmt] * biggest_float)
    working += 4 * rank * (big_in // group_size + big_out)  # the adapter factors of that layer
    shards = None
    if fmt == "gptq":
        shards = [sum(s.nbytes for s in shard) for shard in plan_shards(specs, max_shard_bytes)]
    return MergePlan(
        fmt=fmt, layers=int(config["num_hidden_layers"]), quantized_linears=len(linears),
        input_bytes=sum(s.nbytes for s in specs), output_bytes=output_bytes(config, fmt, bits, group_size),
        adapter_bytes=adapter, largest_linear=f"{big_out}x{big_in}", largest_float_tensor_bytes=biggest_float,
        shards=shards, estimated_peak_bytes=int(BASELINE_BYTES[fmt] + working),
    )
