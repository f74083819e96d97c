"""Planning a merge from ``config.json`` alone: tensor sizes, GPTQ shards, output sizes, memory.

Nothing is read but the model's shape, so a 70B conversion can be planned on any machine
(``benchmarks/bench_scale.py --dry-run``). Shapes follow the LLaMA family (q/k/v/o, gate/up/down
per layer; embeddings and norms fp16; ``lm_head`` fp16 and not quantized, as GPTQ checkpoints
ship it), tensors as :mod:`qalora_export.checkpoint.gptq` lays them out.

Memory model (every converter streams; see docs/scale.md): the peak is

    the format's process baseline + one layer's working set

with the working set a constant number of bytes per weight of the largest quantized linear or a
multiple of the largest float tensor (embedding / lm-head table), whichever is larger: each
format's :class:`~qalora_export.formats.protocol.MemoryModel`. The adapter is not in it: it is read one
layer's factors at a time. The constants are fitted to measured peaks (docs/scale.md): the
7B-shaped benchmark (8 and 32 layers) and a 70B-shaped checkpoint of 1 and 2 layers, which has
the 70B model's largest linear (28672x8192) and full-size tables; the peak does not grow with the
layer count, so an 80-layer plan uses the same figures.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from qalora_export.checkpoint.shapes import checkpoint_tensors, linear_shapes
from qalora_export.formats import get_format
from qalora_export.storage.safetensors_stream import plan_shards

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
    shards: Optional[list[int]]  # formats that shard safetensors (GPTQ): bytes of each output shard
    estimated_peak_bytes: int

    def to_json(self) -> dict:
        return asdict(self)


def plan_merge(config: dict, fmt: str, bits: int = 4, group_size: int = 128, rank: int = 16,
               max_shard_bytes: int = 2 * 1024**3) -> MergePlan:
    """Plan ``merge --to fmt`` of a checkpoint with this ``config.json`` and a rank-``rank`` adapter."""
    specs = checkpoint_tensors(config, bits, group_size)
    linears = linear_shapes(config)
    adapter = sum(4 * rank * (in_f // group_size + out_f) for _, out_f, in_f in linears)
    _, big_out, big_in = max(linears, key=lambda x: x[1] * x[2])
    biggest_float = max(s.nbytes for s in specs if s.name.endswith(".weight"))
    target = get_format(fmt)
    memory = target.memory
    working = max(memory.bytes_per_weight * big_out * big_in, memory.float_tensor_copies * biggest_float)
    working += 4 * rank * (big_in // group_size + big_out)  # the adapter factors of that layer
    shards = None
    if target.writes_shards:
        shards = [sum(s.nbytes for s in shard) for shard in plan_shards(specs, max_shard_bytes)]
    return MergePlan(
        fmt=fmt, layers=int(config["num_hidden_layers"]), quantized_linears=len(linears),
        input_bytes=sum(s.nbytes for s in specs), output_bytes=target.output_bytes(config, bits, group_size),
        adapter_bytes=adapter, largest_linear=f"{big_out}x{big_in}", largest_float_tensor_bytes=biggest_float,
        shards=shards, estimated_peak_bytes=int(memory.baseline_bytes + working),
    )
