"""Running an ONNX decoder export in onnxruntime (with its KV cache) and in onnxruntime-genai.

The graph's interface (``qalora_export/formats/onnx/graph.py``): ``input_ids`` and ``attention_mask`` int64,
``past_key_values.{i}.key|value`` ``[batch, kv_heads, past, head_dim]`` in, ``logits`` float32
``[batch, seq, vocab]`` and ``present.{i}.key|value`` out. Everything here runs batch 1.

onnxruntime and onnxruntime_genai are imported inside the functions that need them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from qalora_export.formats.onnx.spec import GENAI_CONFIG_FILE, MODEL_FILE
from qalora_export.runtimes.isolation import RuntimeInfo

RUNTIME = RuntimeInfo(
    name="onnxruntime",
    crash_hint=("run with -v (or read the log file) for onnxruntime's own messages; reinstall "
                "'qalora-export[onnx]' (onnxruntime and onnxruntime-genai of matching versions)"))



def default_providers() -> list[str]:
    """CUDA first when onnxruntime-gpu provides it, then CPU (which runs any node CUDA lacks)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def accuracy_levels(model_dir: Path) -> set[int]:
    """The ``accuracy_level`` attributes of the MatMulNBits nodes of ``model_dir/model.onnx``."""
    import onnx
    from onnx import helper

    proto = onnx.load(str(Path(model_dir) / MODEL_FILE), load_external_data=False)
    levels = set()
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            levels.add(int(attrs.get("accuracy_level", 0)))
    return levels


def at_accuracy_level(model_dir: Path, level: int, view_dir: Path) -> Path:
    """``model_dir`` itself when every MatMulNBits node has ``accuracy_level == level``; otherwise a
    view in ``view_dir``: a rewritten ``model.onnx`` next to hard links to the other files (copies
    when ``view_dir`` is on another file system)."""
    import onnx
    from onnx import helper

    model_dir = Path(model_dir)
    if accuracy_levels(model_dir) <= {level}:
        return model_dir
    view_dir = Path(view_dir)
    if view_dir.exists():
        shutil.rmtree(view_dir)
    view_dir.mkdir(parents=True)
    proto = onnx.load(str(model_dir / MODEL_FILE), load_external_data=False)
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits":
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend(kept + [helper.make_attribute("accuracy_level", level)])
    onnx.save(proto, str(view_dir / MODEL_FILE))
    for item in model_dir.iterdir():
        if item.name == MODEL_FILE or not item.is_file():
            continue
        # onnxruntime refuses external data outside the model's directory (a symlink resolves
        # outside it), so the data file is hard-linked, or copied across file systems.
        try:
            os.link(item.resolve(), view_dir / item.name)
        except OSError:
            shutil.copyfile(item, view_dir / item.name)
    return view_dir


def eos_ids(model_dir: Path) -> list[int]:
    """End-of-sequence token ids from ``genai_config.json``."""
    cfg = json.loads((Path(model_dir) / GENAI_CONFIG_FILE).read_text())
    eos = cfg["model"].get("eos_token_id")
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])]


def pad_id(model_dir: Path) -> Optional[int]:
    """``pad_token_id`` from ``genai_config.json`` (onnxruntime-genai masks it in prompts)."""
    cfg = json.loads((Path(model_dir) / GENAI_CONFIG_FILE).read_text())
    pad = cfg["model"].get("pad_token_id")
    return None if pad is None else int(pad)


class OrtDecoder:
    """One onnxruntime session on the decoder, with helpers that manage its KV cache.

    Args:
        model_dir: directory with ``model.onnx`` (and ``model.onnx.data``).
        providers: execution providers, default :func:`default_providers`.
        threads: intra-op threads (0 = onnxruntime's default).
    """

    def __init__(self, model_dir: Path, providers: Optional[Sequence[str]] = None, threads: int = 0):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(Path(model_dir) / MODEL_FILE), sess_options=options,
                                            providers=list(providers or default_providers()))
        self.past_names = [i.name for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        first = next(i for i in self.session.get_inputs() if i.name.startswith("past_key_values."))
        self.kv_heads, self.head_dim = int(first.shape[1]), int(first.shape[3])
        self.kv_dtype = np.float16 if "float16" in first.type else np.float32
        self.output_names = [o.name for o in self.session.get_outputs()]

    def empty_cache(self) -> dict[str, np.ndarray]:
        return {n: np.zeros((1, self.kv_heads, 0, self.head_dim), dtype=self.kv_dtype) for n in self.past_names}

    def step(self, ids: Sequence[int], cache: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Run ``ids`` after the tokens held by ``cache``: logits ``[len(ids), vocab]`` and the new cache."""
        past = next(iter(cache.values())).shape[2] if cache else 0
        feeds = {"input_ids": np.asarray([list(ids)], dtype=np.int64),
                 "attention_mask": np.ones((1, past + len(ids)), dtype=np.int64), **cache}
        outs = dict(zip(self.output_names, self.session.run(self.output_names, feeds)))
        new_cache = {n: outs[n.replace("past_key_values.", "present.")] for n in self.past_names}
        return outs["logits"][0], new_cache

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits ``[len(ids), vocab]`` of one full-sequence pass (empty cache)."""
        return self.step(ids, self.empty_cache())[0]

    def incremental_logits(self, ids: Sequence[int], prefill: int) -> np.ndarray:
        """The same logits computed with the cache: ``ids[:prefill]`` at once, then one token a step."""
        out, cache = self.step(ids[:prefill], self.empty_cache())
        rows = [out]
        for token in ids[prefill:]:
            out, cache = self.step([token], cache)
            rows.append(out)
        return np.concatenate(rows, axis=0)

    def greedy(self, prompt: Sequence[int], max_new_tokens: int, eos: Sequence[int] = ()) -> list[int]:
        """Greedy continuation with the KV cache, stopping after an eos token."""
        out, cache = self.step(prompt, self.empty_cache())
        tokens: list[int] = []
        while len(tokens) < max_new_tokens:
            token = int(np.argmax(out[-1]))
            tokens.append(token)
            if token in eos or len(tokens) == max_new_tokens:
                break
            out, cache = self.step([token], cache)
        return tokens

    def close(self) -> None:
        self.session = None


def full_logits(model_dir: Path, prompts: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """onnxruntime's full-sequence logits ``[T, V]`` (float64) per prompt, the model as stored (its own
    accuracy level)."""
    decoder = OrtDecoder(model_dir)
    try:
        return [decoder.logits(p).astype(np.float64) for p in prompts]
    finally:
        decoder.close()


def genai_greedy(model_dir: Path, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation by onnxruntime-genai (``Model(model_dir)``, search ``do_sample=False``)."""
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + max_new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray([list(prompt)], dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    sequence = [int(t) for t in generator.get_sequence(0)]
    del generator, model
    return sequence[len(prompt):]


def genai_tokens_per_second(model_dir: Path, prompt: Sequence[int], new_tokens: int) -> float:
    """Decode speed of onnxruntime-genai: generated tokens per second after the prompt."""
    import time

    import onnxruntime_genai as og

    model = og.Model(str(model_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray([list(prompt)], dtype=np.int32))
    start, count = time.perf_counter(), 0
    while not generator.is_done():
        generator.generate_next_token()
        count += 1
    return count / (time.perf_counter() - start)


def torch_greedy(model, prompt: Sequence[int], max_new_tokens: int, eos: Sequence[int] = ()) -> tuple[list[int], list[float]]:
    """Greedy continuation of a transformers model by full recomputation, and the top-1 minus
    top-2 logit margin at each step (to recognise near-ties)."""
    import torch

    ids = list(prompt)
    tokens, margins = [], []
    with torch.no_grad():
        while len(tokens) < max_new_tokens:
            logits = model(torch.tensor([ids])).logits[0, -1].to(torch.float64)
            top = torch.topk(logits, 2).values
            token = int(torch.argmax(logits))
            tokens.append(token)
            margins.append(float(top[0] - top[1]))
            if token in eos:
                break
            ids.append(token)
    return tokens, margins
