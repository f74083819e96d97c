"""The core verbs and the GPTQ format on every model family (``tests/family_models.py``).

Each family's tiny model carries its real architecture details (Llama-3: llama3 rope scaling, an
untied head; Mistral: sliding window, SentencePiece; Qwen2: q/k/v biases, tied embeddings; Qwen3:
q/k norms, head_dim 64 != 128/4), its full vocabulary and its real chat template. Per family:

- ``quantize`` (RTN and ``--method gptq``): every tensor the checkpoint plan predicts is written,
  biases and norms pass through unchanged (fp16), and GPTQ's layer-0 Hessians equal those of the
  family's own transformers forward (rope variant, q/k norms, masks all feed them), so it beats RTN
  on its objective;
- ``train`` with the family's chat template: the loss mask is exactly the answers and their
  end-of-turn token; with ``--integer-zeros`` the adapter folds exactly into GPTQ zero-points:
  ``merge --to gptq --require-exact`` then ``verify`` in transformers + GPTQModel passes with every
  greedy continuation equal, while the adapter itself moves the logits far beyond the gate;
- a float-zero adapter folds rounded and says so (``--require-exact`` refuses);
- an adapter written by PEFT (``use_qalora``) on the GPTQModel-loaded base computes what our
  unmerged model computes, and folds exactly in float;
- ``inspect`` on the base and the merged artifact.

Time: the verify runtime level runs in this process on two of the fixed prompts (the child process
and the other two prompts only cost time here); GPTQModel caches its dequantized weights
(``GPTQ_TORCH_CACHE_WEIGHTS``), which changes no number.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import family_models
import pytest
import torch

from qalora_export import cli
from qalora_export.checkpoint.adapter_files import load_adapter
from qalora_export.checkpoint.gptq import GPTQCheckpoint
from qalora_export.checkpoint.merged_view import MergedView
from qalora_export.checkpoint.shapes import checkpoint_tensors
from qalora_export.core.families import FAMILIES
from qalora_export.formats import get_format
from qalora_export.formats.gptq.spec import FLOOR_EPS_KL, FLOOR_EPS_LOGIT, FLOOR_FACTOR

pytest.importorskip("gptqmodel")
pytest.importorskip("optimum")

FAMILIES_UNDER_TEST = family_models.FAMILY_NAMES
END_TOKEN = {"llama3": "<|eot_id|>", "mistral": "</s>", "qwen2": "<|im_end|>", "qwen3": "<|im_end|>"}
CALIBRATION = {"n_samples": 8, "seq_len": 64}
RESULTS: dict[str, dict] = {}  # measured numbers, printed at the end of the module (-s)


@pytest.fixture(scope="module", autouse=True)
def gptqmodel_weight_cache():
    """GPTQModel's torch kernel keeps each layer's dequantized weight instead of recomputing it at
    every forward (its own option; same values): the generation steps of verify get cheap."""
    old = os.environ.get("GPTQ_TORCH_CACHE_WEIGHTS")
    os.environ["GPTQ_TORCH_CACHE_WEIGHTS"] = "1"
    yield
    if old is None:
        os.environ.pop("GPTQ_TORCH_CACHE_WEIGHTS", None)
    else:
        os.environ["GPTQ_TORCH_CACHE_WEIGHTS"] = old
    for family, numbers in RESULTS.items():
        print(f"\n{family}: {json.dumps(numbers, default=float)}")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    """A few short instruction records (the generated record-code task)."""
    from qalora_export.fixtures.instruct_task import generate_examples, write_jsonl

    path = tmp_path_factory.mktemp("family-data") / "train.jsonl"
    write_jsonl(path, generate_examples(12, seed=0))
    return path


def run(capsys, *argv) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def logits(model, prompts: list[list[int]]) -> list:
    from qalora_export.formats.gptq.runtime import model_logits

    return model_logits(model, prompts)


def calibration_ids(float_dir: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    from qalora_export.quantization.gptq import calibration_batch, calibration_text

    tok = AutoTokenizer.from_pretrained(str(float_dir))
    return calibration_batch(tok, calibration_text(), CALIBRATION["n_samples"], CALIBRATION["seq_len"])


def layer0_inputs(float_dir: Path, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inputs of every layer-0 projection in the family's own transformers forward, ``[tokens, in]``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(float_dir), dtype=torch.float32).eval()
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for leaf in FAMILIES[model.config.model_type].projections:
        module = model.get_submodule(f"model.layers.0.{leaf}")
        handles.append(module.register_forward_pre_hook(
            lambda m, args, name=f"model.layers.0.{leaf}": seen.__setitem__(name, args[0].reshape(-1, args[0].shape[-1]))))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in handles:
        h.remove()
    return seen


# ----------------------------------------------------------------------------------------- quantize


@pytest.mark.parametrize("family", FAMILIES_UNDER_TEST)
def test_quantize_rtn_and_gptq(family, family_model, tmp_path, capsys, monkeypatch):
    from safetensors import safe_open

    from qalora_export.quantization import gptq_layerwise

    fm = family_model(family)
    config = json.loads((fm.float_dir / "config.json").read_text())
    numbers = RESULTS.setdefault(family, {})

    # RTN through the command line; the fixture's base was made the same way
    code, out = run(capsys, "quantize", fm.float_dir, "-o", tmp_path / "rtn", "--bits", "4", "--group-size", "32")
    assert code == 0, out
    rtn = GPTQCheckpoint(tmp_path / "rtn")
    expected = {s.name: (s.dtype, tuple(s.shape)) for s in checkpoint_tensors(config, 4, 32)}
    written = {k: rtn.tensor_spec(k) for k in rtn.tensor_files}
    assert written == expected  # biases (Qwen2), q/k norms (Qwen3), no head when tied: as planned
    with safe_open(str(fm.float_dir / "model.safetensors"), "pt") as f:
        names = f.keys()
        floats = {k: f.get_tensor(k) for k in names if not k.endswith("_proj.weight")}
    for name, tensor in floats.items():  # norms, biases, embeddings: through unchanged (fp16, as GPTQ stores)
        assert torch.equal(rtn.read_tensor(name), tensor.to(torch.float16)), name
    biases = [k for k in floats if k.endswith(".bias")]
    assert len(biases) == {"qwen2": 6}.get(family, 0)
    assert len([k for k in floats if "_norm." in k and "self_attn" in k]) == {"qwen3": 4}.get(family, 0)
    numbers["rtn_weight_rel_error"] = float(out.split("mean_relative_error", 1)[1].split()[0])
    assert numbers["rtn_weight_rel_error"] < 0.1  # 4-bit g32 min-max of normal weights: ~0.08

    # GPTQ: capture the Hessians the layer-wise calibration hands to the solver
    hessians: dict[str, torch.Tensor] = {}
    solve = gptq_layerwise.gptq_quantize

    def recording(name, weight, H, *args, **kwargs):
        if name.startswith("model.layers.0."):
            hessians[name] = H.clone()
        return solve(name, weight, H, *args, **kwargs)

    calibration: dict[str, torch.Tensor] = {}
    layerwise = gptq_layerwise.gptq_quantize_layerwise

    def recording_layerwise(source, input_ids, *args, **kwargs):
        calibration["ids"] = input_ids
        return layerwise(source, input_ids, *args, **kwargs)

    monkeypatch.setattr(gptq_layerwise, "gptq_quantize", recording)
    monkeypatch.setattr(gptq_layerwise, "gptq_quantize_layerwise", recording_layerwise)
    code, out = run(capsys, "quantize", fm.float_dir, "-o", tmp_path / "gptq", "--bits", "4", "--group-size", "32",
                    "--method", "gptq", "--calibration-samples", CALIBRATION["n_samples"],
                    "--calibration-seq-len", CALIBRATION["seq_len"])
    assert code == 0, out
    numbers["gptq_weight_rel_error"] = float(out.split("mean_relative_error", 1)[1].split()[0])
    gptq = GPTQCheckpoint(tmp_path / "gptq")
    assert {k: gptq.tensor_spec(k) for k in gptq.tensor_files} == expected
    # calibrated on the text as the checkpoint's own tokenizer splits it (SentencePiece for Mistral)
    assert torch.equal(calibration["ids"], calibration_ids(fm.float_dir))
    inputs = layer0_inputs(fm.float_dir, calibration["ids"])
    assert sorted(hessians) == sorted(inputs)
    output_error = {}
    for name, x in inputs.items():
        x = x.to(torch.float64)
        reference = 2.0 * x.T @ x / x.shape[0]
        # the layer-wise forward (embeddings, rope variant, q/k norms, masks) is the family's own
        assert torch.allclose(hessians[name], reference, rtol=1e-4, atol=1e-6 * float(reference.abs().max())), name
        w = torch.from_numpy(floats_weight(fm.float_dir, name)).to(torch.float64)
        err = {m: float((x @ (w - ckpt.read_layer(name).dequantize()).T).norm())
               for m, ckpt in (("rtn", rtn), ("gptq", gptq))}
        assert err["gptq"] < err["rtn"], f"{name}: GPTQ output error {err['gptq']:.4g} >= RTN's {err['rtn']:.4g}"
        output_error[name.rsplit(".", 1)[-1]] = round(err["gptq"] / err["rtn"], 3)
    numbers["gptq_over_rtn_layer0_output_error"] = output_error


def floats_weight(float_dir: Path, module: str):
    from safetensors import safe_open

    with safe_open(str(float_dir / "model.safetensors"), "np") as f:
        return f.get_tensor(f"{module}.weight")


# ----------------------------------------------------------------------------------------- answer masks


def test_answer_masks_cover_the_answers_and_their_end_token(family_model):
    from transformers import AutoTokenizer

    from qalora_export.training.examples import IGNORE_INDEX, tokenize_example

    conversation = [{"role": "user", "content": "One?"}, {"role": "assistant", "content": "first answer"},
                    {"role": "user", "content": "Two?"}, {"role": "assistant", "content": "second answer"}]
    for family in FAMILIES_UNDER_TEST:
        tok = AutoTokenizer.from_pretrained(str(family_model(family).base_dir))
        end = END_TOKEN[family]
        assert tok.eos_token == end
        for messages in (conversation[:2], conversation):
            example = tokenize_example(tok, messages, max_length=None)
            runs, current = [], []
            for token, label in zip(example.input_ids, example.labels):
                if label != IGNORE_INDEX:
                    assert label == token
                    current.append(token)
                elif current:
                    runs.append(current)
                    current = []
            runs += [current] if current else []
            answers = [m["content"] for m in messages if m["role"] == "assistant"]
            assert [tok.decode(r) for r in runs] == [a + end for a in answers], family
            assert all(r[-1] == tok.convert_tokens_to_ids(end) for r in runs)
            # the first answer starts where the model's generation prompt ends ...
            prompt = tok.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=False)
            start = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
            if family == "qwen3" and len(messages) == 2:
                # ... after the empty think block Qwen3's template puts before the last answer: the
                # prompt of its non-thinking mode, context rather than answer
                prompt = tok.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=False,
                                                 enable_thinking=False)
                assert "<think>\n\n</think>\n\n" in prompt
            assert start == len(tok(prompt, add_special_tokens=False)["input_ids"]), family
    # Qwen3 renders earlier turns without their think block: the mask still follows the text
    qwen3 = AutoTokenizer.from_pretrained(str(family_model("qwen3").base_dir))
    full = qwen3.apply_chat_template(conversation, tokenize=False)
    assert full.count("<think>") == 1
    # Mistral's template folds a system prompt into the first [INST] block: context, not answer
    # (a template that drops a message instead is refused: tests/unit/training/test_chat.py)
    mistral = AutoTokenizer.from_pretrained(str(family_model("mistral").base_dir))
    example = tokenize_example(mistral, [{"role": "system", "content": "Be brief."}] + conversation[:2], None)
    answer = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
    assert mistral.decode(answer) == conversation[1]["content"] + "</s>"


# ----------------------------------------------------------------------------------------- train, merge, verify


@pytest.mark.parametrize("family", FAMILIES_UNDER_TEST)
def test_integer_zero_training_folds_exactly_into_gptq_and_verifies(family, family_model, data_file, tmp_path,
                                                                   capsys):
    from qalora_export.modeling.model import build_model
    from qalora_export.runtimes.compare import compare_logits
    from qalora_export.runtimes.isolation import call_isolated
    from qalora_export.training.evaluate import cached_base_weights
    from qalora_export.verify import fixed_prompts

    fm = family_model(family)
    numbers = RESULTS.setdefault(family, {})
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    code, out = run(capsys, "train", fm.base_dir, "--data", data_file, "-o", adapter, "--rank", 4, "--alpha", 8,
                    "--steps", 3, "--lr", 0.1, "--batch-size", 4, "--max-length", 96,
                    "--held-out", 0, "--integer-zeros")
    assert code == 0, out
    log = [json.loads(line) for line in (adapter / "training_log.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in log if "loss" in row]
    assert len(losses) == 3 and losses[-1] < losses[0]
    numbers["train_loss_first_last"] = (losses[0], losses[-1])

    code, out = run(capsys, "merge", fm.base_dir, adapter, "--to", "gptq", "-o", merged, "--require-exact",
                    "--no-verify")
    assert code == 0, out
    code, out = run(capsys, "verify", merged, "--base", fm.base_dir, "--adapter", adapter, "--weights-only",
                    "--report", tmp_path / "verify.json")
    assert code == 0, out
    weights = json.loads((tmp_path / "verify.json").read_text())["weights"]
    assert weights["passed"] and weights["merge"]["exact"] and weights["max_abs_vs_unmerged"] == 0.0
    # everything but the zero-points is the base's, byte for byte: codes, scales, biases, norms, embeddings
    base_ckpt, merged_ckpt = GPTQCheckpoint(fm.base_dir), GPTQCheckpoint(merged)
    assert sorted(merged_ckpt.tensor_files) == sorted(base_ckpt.tensor_files)
    for name in base_ckpt.tensor_files:
        if not name.endswith(".qzeros"):
            assert torch.equal(merged_ckpt.read_tensor(name), base_ckpt.read_tensor(name)), name
    config = {k: v for k, v in merged_ckpt.model_config.items() if k != "quantization_config"}
    planned = get_format("gptq").output_bytes(config, 4, 32)
    assert planned == sum(merged_ckpt.read_tensor(n).nbytes for n in merged_ckpt.tensor_files)

    prompts = fixed_prompts(fm.base_dir)[:2]
    # verify's runtime level, in a child process as verify runs it (runtimes/isolation.py)
    report = call_isolated("qalora_export.verify:runtime_level",
                           {"fmt": "gptq", "artifact": str(merged), "base_dir": str(fm.base_dir),
                            "adapter_dir": str(adapter), "pooling": None, "prompts": prompts, "device": "cpu"},
                           get_format("gptq").runtime, timeout=900)
    floor, result = report["floor"], report["artifact_vs_unmerged"]
    assert report["passed"] and report["exact_merge"], report
    assert result["greedy_match"] == 1.0 and result["top1_agreement"] == 1.0
    numbers["gptq_verify"] = {k: result[k] for k in ("max_abs_logit_diff", "mean_kl", "top1_agreement",
                                                      "greedy_match")} | {"floor_max_abs_logit_diff":
                                                                          floor["max_abs_logit_diff"]}

    # the check can fail: the adapter moves the model far more than the gate allows
    plain, tuned = build_model(fm.base_dir), build_model(fm.base_dir, load_adapter(adapter))
    with cached_base_weights(plain), cached_base_weights(tuned):
        effect = compare_logits(logits(plain, prompts), logits(tuned, prompts))
    assert effect.max_abs_logit_diff > 20 * (FLOOR_FACTOR * floor["max_abs_logit_diff"] + FLOOR_EPS_LOGIT)
    assert effect.mean_kl > 1000 * (FLOOR_FACTOR * floor["mean_kl"] + FLOOR_EPS_KL)
    numbers["adapter_effect"] = {"max_abs_logit_diff": effect.max_abs_logit_diff, "mean_kl": effect.mean_kl}

    # inspect both ends
    model_type = json.loads((fm.base_dir / "config.json").read_text())["model_type"]
    for path, merged_record in ((fm.base_dir, False), (merged, True)):
        code, out = run(capsys, "inspect", path)
        assert code == 0, out
        info = json.loads(out[out.index("{"):out.rindex("}") + 1])
        assert info["model_type"] == model_type and info["quantized_layers"] == 14
        assert info["float_tensors"] == 7 - int(model_type in ("qwen2", "qwen3")) + 4 * int(model_type == "qwen3")
        assert (info["qalora_export"] or {}).get("exact") is (True if merged_record else None)


@pytest.mark.parametrize("family", FAMILIES_UNDER_TEST)
def test_float_zero_fold_is_rounded_and_reported(family, family_model, tmp_path, capsys):
    fm = family_model(family)
    code, out = run(capsys, "merge", fm.base_dir, fm.adapter_dir, "--to", "gptq", "-o", tmp_path / "strict",
                    "--require-exact", "--no-verify")
    assert code == 2 and "--require-exact" in out and not (tmp_path / "strict").exists()
    summary = get_format("gptq").export(MergedView.open(fm.base_dir, fm.adapter_dir), tmp_path / "rounded")
    assert summary["exact"] is False and summary["zeros_moved"] > 0 and 0 < summary["max_zero_change"] <= 0.5
    meta = json.loads((tmp_path / "rounded" / "config.json").read_text())["quantization_config"]["meta"]
    assert meta["qalora_export"]["exact"] is False and meta["qalora_export"]["zeros_moved"] == summary["zeros_moved"]
    RESULTS.setdefault(family, {})["float_fold_rounded"] = {"zeros_moved": summary["zeros_moved"],
                                                            "of": summary["zeros_total"],
                                                            "max_zero_change": summary["max_zero_change"]}


# ----------------------------------------------------------------------------------------- PEFT adapters


@pytest.mark.parametrize("family", FAMILIES_UNDER_TEST)
def test_peft_qalora_adapter_matches_and_folds(family, family_model, tmp_path):
    import peft

    from qalora_export.formats.gptq.runtime import load_gptq_model
    from qalora_export.modeling.model import build_model
    from qalora_export.runtimes.compare import compare_logits
    from qalora_export.verify import fixed_prompts

    fm = family_model(family)
    prompts = fixed_prompts(fm.base_dir)[:1]
    runtime = load_gptq_model(fm.base_dir)
    theirs_base = logits(runtime, prompts)
    targets = FAMILIES[runtime.config.model_type].target_modules
    config = peft.LoraConfig(r=4, lora_alpha=8, use_qalora=True, qalora_group_size=32, target_modules=list(targets),
                             lora_dropout=0.0, task_type="CAUSAL_LM")
    peft_model = peft.get_peft_model(runtime, config)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero: make the adapter do something
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
            elif "lora_A" in name:
                param.mul_(3.0)
    theirs = logits(peft_model, prompts)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    del peft_model, runtime

    adapter = load_adapter(tmp_path / "peft")  # use_qalora is the evidence: no --pooling
    assert adapter.pooling == "peft" and adapter.pool_groups == "consecutive" and len(adapter.layers) == 14
    ours_base = logits(build_model(fm.base_dir), prompts)
    ours = logits(build_model(fm.base_dir, adapter), prompts)
    floor = compare_logits(ours_base, theirs_base).max_abs_logit_diff
    parity = compare_logits(ours, theirs).max_abs_logit_diff
    effect = compare_logits(ours_base, ours).max_abs_logit_diff
    tolerance = FLOOR_FACTOR * floor + FLOOR_EPS_LOGIT
    assert parity <= tolerance and effect > 20 * tolerance, (floor, parity, effect)
    # foldable: the float fold equals the unmerged effective weight W_hat + dW of every layer
    view = MergedView.open(fm.base_dir, tmp_path / "peft")
    worst = 0.0
    for name in view.quantized_modules:
        folded, _ = view.read_layer(name)
        reference = view.reference_weight(name)
        worst = max(worst, float((folded.dequantize() - reference).abs().max() / reference.abs().max()))
    assert worst < 1e-12
    RESULTS.setdefault(family, {})["peft"] = {"floor": floor, "parity": parity, "effect": effect,
                                              "fold_rel_error": worst}


# ----------------------------------------------------------------------------------------- MLX


@pytest.mark.slow  # ~20-30 s a family on 2 cores: mlx-lm's CPU backend in verify's child process
@pytest.mark.parametrize("family", FAMILIES_UNDER_TEST)
def test_mlx_export_of_every_family_verifies_in_mlx_lm(family, family_model, tmp_path):
    """mlx-lm 0.32.2 runs all four (Mistral as llama, llama3 rope, Qwen2 biases, Qwen3 q/k norms and
    head_dim 64) and holds the float fold exactly in float32."""
    pytest.importorskip("mlx_lm")
    from qalora_export.verify import verify_artifact

    fm = family_model(family)
    out = tmp_path / "mlx"
    get_format("mlx").export(MergedView.open(fm.base_dir, fm.adapter_dir), out)
    report = verify_artifact(out, fm.base_dir, fm.adapter_dir)
    artifact = report["runtime"]["artifact"]
    assert report["passed"], report["runtime"]
    assert artifact["greedy_exact_match"] == len(artifact["greedy"]) and artifact["max_abs_logit_diff_rel"] < 1e-5
