"""Peak memory of a merge does not grow with the number of layers (every format streams).

Two random GPTQ checkpoints of the same layer shape, 4 and 24 layers (~5.5 MB of packed weights a
layer, written with the project's writer, sharded), each merged with a random adapter in a fresh
subprocess; the peak RSS of the two runs (``wait4`` rusage of that child alone) must differ by
far less than the 20 extra layers' bytes. A merge that kept layers, or kept a whole shard mapped
(safetensors maps files, and touched pages count in RSS), grows by at least those bytes.
No timing is asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qalora_export.core.adapter import AdapterLayer, QALoRAAdapter
from qalora_export.checkpoint.adapter_files import save_adapter
from qalora_export.checkpoint.gptq_writer import CheckpointWriter, write_configs
from qalora_export.checkpoint.gptq import GPTQCheckpoint
from qalora_export.checkpoint.gptq_config import GPTQConfig
from qalora_export.core.packing import pack_codes
from qalora_export.checkpoint.shapes import checkpoint_tensors, linear_shapes

BITS, GROUP_SIZE = 4, 128
SHAPE = {"model_type": "llama", "hidden_size": 1024, "intermediate_size": 2048, "num_attention_heads": 8,
         "num_key_value_heads": 8, "vocab_size": 512, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
         "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2}
SMALL, LARGE = 4, 24

LAUNCHER = r"""
import json, os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
_, status, usage = os.wait4(proc.pid, 0)
print(json.dumps({"rc": os.waitstatus_to_exitcode(status), "peak_rss": usage.ru_maxrss * 1024,
                  "stderr": proc.stderr.read().decode()[-3000:]}))
"""


def make_random_base(out: Path, layers: int, tokenizer) -> tuple[Path, Path]:
    config = dict(SHAPE, num_hidden_layers=layers)
    base = out / f"base-{layers}"
    base.mkdir(parents=True)
    rng = np.random.default_rng(layers)
    writer = CheckpointWriter(base, max_shard_bytes=16 << 20)
    for spec in checkpoint_tensors(config, BITS, GROUP_SIZE):
        if spec.name.endswith(".qweight"):
            t = torch.from_numpy(rng.integers(-2**31, 2**31, size=spec.shape, dtype=np.int64).astype(np.int32))
        elif spec.name.endswith(".qzeros"):
            t = pack_codes(torch.from_numpy(rng.integers(7, 9, size=(spec.shape[0], spec.shape[1] * 8))), BITS, dim=1)
        elif spec.name.endswith(".scales"):
            t = torch.from_numpy(rng.uniform(0.002, 0.02, size=spec.shape).astype(np.float16))
        elif spec.name.endswith(".g_idx"):
            t = (torch.arange(spec.shape[0]) // GROUP_SIZE).to(torch.int32)
        else:
            t = torch.from_numpy((rng.standard_normal(spec.shape) * 0.02).astype(np.float16))
        writer.add_tensor(spec.name, t)
    writer.finish()
    write_configs(base, config, GPTQConfig(BITS, GROUP_SIZE, desc_act=False, sym=False, checkpoint_format="gptq_v2"))
    tokenizer(base)
    gen = torch.Generator().manual_seed(layers)
    adapter_layers = {name: AdapterLayer(lora_A=torch.randn(8, in_f // GROUP_SIZE, generator=gen) * 0.02,
                                         lora_B=torch.randn(out_f, 8, generator=gen) * 0.02)
                      for name, out_f, in_f in linear_shapes(config)}
    adapter = out / f"adapter-{layers}"
    save_adapter(QALoRAAdapter(layers=adapter_layers, rank=8, alpha=16.0, pooling="peft", pool_group_size=GROUP_SIZE,
                               pool_groups="quantization", base_fingerprint=GPTQCheckpoint(base).fingerprint()),
                 adapter, base_model_path=str(base))
    return base, adapter


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    from gguf_helpers import make_tiny_bpe_tokenizer

    root = tmp_path_factory.mktemp("scale_memory")
    return {n: make_random_base(root, n, make_tiny_bpe_tokenizer) for n in (SMALL, LARGE)}


def peak_rss_of_merge(base: Path, adapter: Path, fmt: str, out: Path) -> int:
    cmd = [sys.executable, "-m", "qalora_export.cli", "merge", str(base), str(adapter), "--to", fmt, "-o", str(out),
           "--no-verify"]
    if fmt == "onnx":
        cmd += ["--zero-points", "split"]
    done = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, *cmd], capture_output=True, text=True,
                          env=dict(os.environ, CI="1"), timeout=600)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["rc"] == 0, result["stderr"]
    return result["peak_rss"]


@pytest.mark.parametrize("fmt", ["gptq", "onnx", "gguf"])
def test_peak_memory_does_not_grow_with_layer_count(checkpoints, fmt, tmp_path):
    (small_base, small_adapter), (large_base, large_adapter) = checkpoints[SMALL], checkpoints[LARGE]
    suffix = ".gguf" if fmt == "gguf" else ""
    small = peak_rss_of_merge(small_base, small_adapter, fmt, tmp_path / f"small{suffix}")
    large = peak_rss_of_merge(large_base, large_adapter, fmt, tmp_path / f"large{suffix}")
    layer_bytes = [sum(p.stat().st_size for p in b.glob("*.safetensors")) for b in (small_base, large_base)]
    extra = layer_bytes[1] - layer_bytes[0]
    assert extra > 80e6, "the test needs the extra layers to outweigh RSS noise"
    # A merge holding the model grows by >= extra; streaming stays flat up to allocator noise.
    assert large - small < 0.25 * extra, (
        f"{fmt}: peak RSS {small / 2**20:.0f} MiB at {SMALL} layers, {large / 2**20:.0f} MiB at {LARGE} "
        f"(+{(large - small) / 2**20:.0f} MiB for +{extra / 2**20:.0f} MiB of weights)")
