"""PEFT parity: our unmerged QA-LoRA forward equals PEFT's on the same GPTQ base.

The reference runtime is transformers + GPTQModel (``backend="gptq_torch"``, float32 activations)
with ``peft.PeftModel`` on top, reading the adapter directory as it is on disk. GPTQModel
dequantizes the base in fp16, so even without an adapter its logits differ from ours by a small
amount (the base floor). With the adapter, the difference must stay close to that floor, while
the adapter itself moves the logits by far more (so the test cannot pass vacuously). A second,
sharper comparison rounds our dequantized base weights to fp16 the way GPTQModel does: the base
floor then vanishes and the adapted logits must agree to float32 round-off (measured: exactly).

Cases: adapters written by our trainer and by ``make_random_adapter`` on contiguous 2-, 3- and
4-bit bases (adapter_config.json with ``use_qalora``), and an adapter written by PEFT itself,
whose convention ("peft") our loader must infer without a flag.
"""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path

import pytest
import torch

import tiny_models
from qalora_export.checkpoint.adapter_files import ADAPTER_METADATA, load_adapter
from qalora_export.modeling.model import TARGET_MODULES, build_model
from qalora_export.modeling.qalora_linear import QALoRALinear
from qalora_export.training.config import TrainConfig
from qalora_export.training.train import train_adapter

GROUP_SIZE = 16


def gptqmodel_base(base: Path, bits: int):
    """The base as transformers + GPTQModel load it (exact CPU path: gptq_torch, float32)."""
    from transformers import AutoModelForCausalLM, GPTQConfig

    return AutoModelForCausalLM.from_pretrained(
        str(base), quantization_config=GPTQConfig(bits=bits, backend="gptq_torch"), dtype=torch.float32)


def no_compile():
    """GPTQModel's torch kernel would otherwise compile once per input shape (minutes on CPU)."""
    return torch._dynamo.config.patch(disable=True)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def check_parity(ours: torch.Tensor, theirs: torch.Tensor, ours_base: torch.Tensor, theirs_base: torch.Tensor):
    """Adapter logits agree to within a small factor of the base floor; the adapter matters."""
    floor = max_diff(ours_base, theirs_base)
    diff = max_diff(ours, theirs)
    effect = max_diff(ours, ours_base)
    # measured on these bases: floor 5e-5 (2-bit) to 1.1e-3 (3/4-bit); diff / floor 0.5 .. 2.9
    # (the adapter moves activations, and GPTQModel's fp16 weight error moves with them)
    tolerance = 4.0 * floor + 2e-4
    assert floor < 5e-3, f"base floor {floor:.2e}: the two runtimes disagree on the base itself"
    assert effect > 100 * tolerance, f"adapter effect {effect:.3g} too small against tolerance {tolerance:.2e}"
    assert diff <= tolerance, f"adapter logits differ by {diff:.3e}; base floor {floor:.3e}"


@contextlib.contextmanager
def fp16_rounded_base():
    """Our model with its dequantized base weights rounded to fp16, as GPTQModel's kernel has them."""
    original = QALoRALinear.dequantized_weight

    def rounded(self, dtype=None):
        return original(self, dtype).to(torch.float16).to(dtype or self.compute_dtype)

    QALoRALinear.dequantized_weight = rounded
    try:
        yield
    finally:
        QALoRALinear.dequantized_weight = original


def check_exact_parity(base: Path, adapter_dir: Path, theirs: torch.Tensor, theirs_base: torch.Tensor,
                       ids: torch.Tensor) -> None:
    """With the same fp16 base weights, base and adapted logits agree to float32 round-off."""
    with fp16_rounded_base():
        ours_base = logits(build_model(base), ids)
        ours = logits(build_model(base, load_adapter(adapter_dir)), ids)
    assert max_diff(ours_base, theirs_base) <= 1e-5
    assert max_diff(ours, theirs) <= 1e-5, "the adapter path differs from PEFT's beyond round-off"
    assert max_diff(ours, ours_base) > 0.5


@pytest.fixture(scope="module")
def prompt_ids() -> torch.Tensor:
    return torch.randint(4, tiny_models.TINY_VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def copy_data(tmp_path_factory) -> Path:
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    with open(path, "w") as f:
        for _ in range(48):
            words = [f"w{rng.randint(10, 40)}" for _ in range(4)]
            f.write(json.dumps({"instruction": " ".join(words), "output": " ".join(reversed(words))}) + "\n")
    return path


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_unmerged_forward_equals_peft_for_trained_and_random_adapters(bits, tmp_path, copy_data, prompt_ids):
    base = tiny_models.make_tiny_base(tmp_path / f"base-w{bits}g{GROUP_SIZE}", bits=bits, group_size=GROUP_SIZE)
    trained = tmp_path / "trained"
    train_adapter(base, copy_data, trained, TrainConfig(rank=4, alpha=8.0, steps=12, lr=5e-2, batch_size=8,
                                                        max_length=32, warmup_steps=0, held_out=0, seed=bits))
    random_dir = tiny_models.make_random_adapter(base, tmp_path / "random", rank=4, alpha=8.0, seed=bits,
                                                 pool_groups="consecutive", magnitude=0.3)
    ours_base = logits(build_model(base), prompt_ids)
    with no_compile():
        hf = gptqmodel_base(base, bits)
        import peft

        peft_model = peft.PeftModel.from_pretrained(hf, str(trained), adapter_name="trained")
        peft_model.load_adapter(str(random_dir), adapter_name="random")
        assert peft_model.peft_config["trained"].use_qalora and peft_model.peft_config["random"].use_qalora
        with peft_model.disable_adapter():
            theirs_base = logits(peft_model, prompt_ids)
        for name, directory in (("trained", trained), ("random", random_dir)):
            peft_model.set_adapter(name)
            theirs = logits(peft_model, prompt_ids)
            ours = logits(build_model(base, load_adapter(directory)), prompt_ids)
            check_parity(ours, theirs, ours_base, theirs_base)
            check_exact_parity(base, directory, theirs, theirs_base, prompt_ids)


def test_peft_written_adapter_is_read_as_peft_pooling_and_matches(tmp_path, prompt_ids):
    import peft

    bits = 4
    base = tiny_models.make_tiny_base(tmp_path / "base-w4g16", bits=bits, group_size=GROUP_SIZE)
    adapter_dir = tmp_path / "peft-adapter"
    with no_compile():
        hf = gptqmodel_base(base, bits)
        theirs_base = logits(hf, prompt_ids)
        config = peft.LoraConfig(r=4, lora_alpha=8, use_qalora=True, qalora_group_size=GROUP_SIZE,
                                 target_modules=list(TARGET_MODULES), lora_dropout=0.0, task_type="CAUSAL_LM")
        peft_model = peft.get_peft_model(hf, config)
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:  # PEFT initialises B to zero: make the adapter do something
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
                elif "lora_A" in name:
                    param.mul_(3.0)
        theirs = logits(peft_model, prompt_ids)
        peft_model.save_pretrained(str(adapter_dir))
    assert not (adapter_dir / ADAPTER_METADATA).exists()  # PEFT's files only
    adapter = load_adapter(adapter_dir)  # no --pooling: use_qalora is the evidence
    assert adapter.pooling == "peft" and adapter.pool_groups == "consecutive"
    assert adapter.pool_group_size == GROUP_SIZE and adapter.rank == 4 and adapter.alpha == 8
    assert len(adapter.layers) == 14  # 7 projections x 2 layers
    ours_base = logits(build_model(base), prompt_ids)
    ours = logits(build_model(base, adapter), prompt_ids)
    check_parity(ours, theirs, ours_base, theirs_base)
    check_exact_parity(base, adapter_dir, theirs, theirs_base, prompt_ids)
