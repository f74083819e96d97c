"""GPTQ over a float model one decoder layer at a time, so that a 7B model fits one GPU and its RAM.

The model is built on the ``meta`` device (no memory); only the input embedding and the rotary
tables are materialised for the whole run. Then, for each decoder layer in order:

1. its tensors are read from the :class:`~qalora_export.checkpoint.float_source.FloatSource` (float32, on
   ``device``);
2. the calibration hidden states (inputs of this layer, ``[n, seq, hidden]``) run through it in
   chunks of about ``batch_tokens`` tokens while forward pre-hooks accumulate each projection's
   Hessian ``2 X.T X`` (projections fed the same input, q/k/v and gate/up, share one sum);
3. every ``*_proj`` is GPTQ-quantized (:func:`qalora_export.quantization.gptq.gptq_quantize`), handed to
   ``on_layer`` (which writes it out) and replaced by its dequantized weight;
4. the calibration chunks run through the quantized layer again: its outputs are the next layer's
   inputs (as in the GPTQ reference: each layer is calibrated on what the quantized layers before
   it produce);
5. the layer goes back to ``meta``.

Peak memory is therefore the embedding, one decoder layer in float32, one layer's Hessians
(four ``[in, in]`` sums for a LLaMA layer), two copies of the calibration hidden states
(``n * seq * hidden`` values in ``activation_dtype``) and one chunk's intermediate activations — not
the model. For LLaMA-7B with 128 x 512 calibration tokens: 0.8 GB layer, 1.4 GB Hessians in
float64 (0.7 GB in float32 on CUDA), 2 x 1 GB hidden states in float32.

Numerics: layers always compute in float32; hidden states are *stored* between layers in
``activation_dtype``: float32 by default on every device; float16 or bfloat16 halve that memory
when it matters (a 70B model's calibration set), at a measured cost: on SmolLM2 float16 storage
gave perplexity 25.29 instead of 24.84 at 4 bits and 3105 instead of 1078 at 2 bits (its hidden
states reach 26k, 40% of float16's range; ``docs/results.md``), and a non-finite stored value is
refused. Hessians accumulate in float64 on CPU and float32 on CUDA (float64 GEMMs are slow on
most GPUs; the GPTQ reference accumulates in float32); the GPTQ solve itself is float64
everywhere. On CPU the result is bit-identical to running GPTQ on the whole float model, in one
chunk or several (measured on SmolLM2 and the tiny test models).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from qalora_export.core.record import QuantizedLinear
from qalora_export.errors import CheckpointError, ConfigError
from qalora_export.quantization.gptq import DEFAULT_DAMP, gptq_quantize

DEFAULT_BATCH_TOKENS = 8192
ACTIVATION_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# on_layer(module path, quantized record, float weight [out, in] as read from the source)
LayerSink = Callable[[str, QuantizedLinear, torch.Tensor], None]


class _Captured(Exception):
    """Raised by the hook on decoder layer 0 once its inputs are seen (nothing after it runs)."""


def resolve_device(device: str) -> torch.device:
    """``device`` as a torch device; ConfigError when it names CUDA on a machine without it."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from exc
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device!r}: GPTQ calibration runs on cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return dev


def resolve_activation_dtype(name: Optional[str], device: torch.device) -> torch.dtype:
    """The storage dtype of calibration hidden states: ``name``, default float32 (on every device:
    float16 storage measurably hurt GPTQ on SmolLM2; see the module docstring)."""
    if name is None:
        return torch.float32
    if name not in ACTIVATION_DTYPES:
        raise ConfigError(f"--calibration-dtype {name!r}: choose one of {sorted(ACTIVATION_DTYPES)}")
    return ACTIVATION_DTYPES[name]


def build_skeleton(model_config: dict) -> torch.nn.Module:
    """The ``*ForCausalLM`` of ``model_config`` with every parameter on ``meta`` (no memory)."""
    from transformers import AutoModelForCausalLM

    from qalora_export.modeling.model import hf_config_from

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config_from(model_config), dtype=torch.float32)
    model.eval()
    return model


def check_one_attention_mask(config, seq_len: int) -> None:
    """Refuse calibration windows on which the decoder layers would need different attention masks.

    Every layer is run with the keyword arguments captured at layer 0 (its mask among them). Models
    whose layers mix full and sliding-window attention (``layer_types``, e.g. Qwen2/Qwen3 with
    ``use_sliding_window``) need one mask per type once a window is longer than ``sliding_window``;
    on shorter windows the masks coincide.
    """
    types = set(getattr(config, "layer_types", None) or [])
    window = getattr(config, "sliding_window", None)
    if len(types) > 1 and window and seq_len > int(window):
        raise ConfigError(
            f"the model's layers mix attention types ({', '.join(sorted(types))}; sliding_window={window}) and "
            f"--calibration-seq-len {seq_len} is longer than the window: layer-wise GPTQ runs every layer with "
            f"layer 0's attention mask, which is right only up to {window} tokens; pass --calibration-seq-len "
            f"{window} or less")


def _module_paths(model: torch.nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules()}


def materialize_module(module: torch.nn.Module, prefix: str, source, device: torch.device) -> None:
    """Give ``module``'s parameters (state-dict entries) real float32 storage on ``device``, read
    from ``source`` under ``prefix``; CheckpointError naming the first tensor the source lacks."""
    module.to_empty(device=device)
    names = set(source.tensor_names())
    with torch.no_grad():
        for key, target in module.state_dict(keep_vars=True).items():
            full = f"{prefix}.{key}" if prefix else key
            if full not in names:
                raise CheckpointError(f"{source.path}: tensor {full} is missing from the float model")
            tensor = source.read_tensor(full)
            if tuple(tensor.shape) != tuple(target.shape):
                raise CheckpointError(f"{source.path}: tensor {full} is {tuple(tensor.shape)}, the config "
                                      f"implies {tuple(target.shape)}")
            target.copy_(tensor.to(torch.float32))


def release_module(module: torch.nn.Module) -> None:
    """Return ``module``'s storage (its parameters go back to ``meta``)."""
    module.to("meta")


def _rebuild_rotary(model: torch.nn.Module, device: torch.device) -> None:
    """Rotary modules hold computed (non-persistent) buffers: construct them afresh on ``device``."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child).__name__.endswith("RotaryEmbedding"):
                setattr(parent, child_name, type(child)(config=child.config).to(device))


def _capture_layer_inputs(model, input_ids: torch.Tensor, rows: int, device: torch.device,
                          activation_dtype: torch.dtype) -> tuple[list[torch.Tensor], dict[int, dict]]:
    """Hidden states entering decoder layer 0, chunk by chunk (``rows`` samples each), and the
    layer's keyword arguments (mask, rotary tables, positions) per chunk size."""
    layers = model.model.layers
    captured: dict = {}

    def catch(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        captured["kwargs"] = {k: v for k, v in kwargs.items()
                              if k not in ("hidden_states", "past_key_values", "past_key_value")}
        raise _Captured

    hidden: list[torch.Tensor] = []
    kwargs_by_rows: dict[int, dict] = {}
    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for start in range(0, input_ids.shape[0], rows):
            chunk = input_ids[start:start + rows].to(device)
            try:
                model(input_ids=chunk, use_cache=False)
            except _Captured:
                pass
            hidden.append(_stored(captured["hidden"], activation_dtype, "the embedding output"))
            # Same batch size -> same mask, positions and rotary tables (windows have no padding).
            kwargs_by_rows.setdefault(chunk.shape[0], captured["kwargs"])
    finally:
        handle.remove()
    return hidden, kwargs_by_rows


def _stored(h: torch.Tensor, dtype: torch.dtype, where: str) -> torch.Tensor:
    """``h`` in the storage dtype; ConfigError when that dtype cannot hold it (float16 overflow)."""
    out = h.to(dtype)
    if dtype != h.dtype and not bool(torch.isfinite(out).all()):
        raise ConfigError(
            f"calibration activations of {where} reach {float(h.abs().max()):.4g}, beyond --calibration-dtype "
            f"{str(dtype).removeprefix('torch.')}; use --calibration-dtype float32 (default) or bfloat16")
    return out


def _run_layer(layer, hidden: list[torch.Tensor], kwargs_by_rows: dict[int, dict],
               activation_dtype: torch.dtype, where: str) -> list[torch.Tensor]:
    """The layer's outputs for every chunk, computed in float32, stored in ``activation_dtype``."""
    out = []
    for h in hidden:
        result = layer(h.to(torch.float32), **kwargs_by_rows[h.shape[0]])
        out.append(_stored(result[0] if isinstance(result, tuple) else result, activation_dtype, where))
    return out


@torch.no_grad()
def gptq_quantize_layerwise(source, input_ids: torch.Tensor, bits: int, group_size: int, on_layer: LayerSink,
                            act_order: bool = False, damp: float = DEFAULT_DAMP, min_zero: int = 0,
                            quantize: Optional[set[str]] = None, device: str = "cpu",
                            activation_dtype: Optional[str] = None, batch_tokens: int = DEFAULT_BATCH_TOKENS,
                            progress: Optional[Callable[[str], None]] = None, group_aware_order: bool = False,
                            true_sequential: bool = False) -> None:
    """GPTQ every ``*_proj`` of a LLaMA-family float model, one decoder layer in memory at a time.

    Args:
        source: a :class:`~qalora_export.checkpoint.float_source.FloatSource` (config and tensors by name).
        input_ids: calibration windows, int64 ``[n, seq]`` (:func:`gptq_quant.calibration_batch`).
        on_layer: receives each quantized projection as soon as it is done, in layer order
            (``model.layers.0.self_attn.q_proj`` first), with the float weight it replaced.
        quantize: module paths to quantize (default every ``*_proj`` linear of every layer);
            projections not in it keep their float weight for the calibration forward.
        device: "cpu" or "cuda[:n]": where the current layer, the hidden states and the Hessians live.
        activation_dtype: "float32" (default), "float16" or "bfloat16" storage of the hidden
            states between layers.
        batch_tokens: calibration tokens per forward chunk (bounds the layer's intermediate
            activations; at least one window per chunk).
        progress: called with each projection's module path before it is quantized.
        group_aware_order: GPTQ column order (:func:`qalora_export.quantization.gptq.gptq_quantize`).
        true_sequential: inside each decoder layer, quantize the projections fed by one input
            (q/k/v, then o, then gate/up, then down) one set at a time, each calibrated on what the
            already quantized ones produce (GPTQModel's ``true_sequential``): one calibration pass
            per set instead of one per layer.
    """
    dev = resolve_device(device)
    act_dtype = resolve_activation_dtype(activation_dtype, dev)
    if isinstance(batch_tokens, bool) or not isinstance(batch_tokens, int) or batch_tokens < 1:
        raise ConfigError(f"batch_tokens must be a positive integer, got {batch_tokens!r}")
    hessian_dtype = torch.float64 if dev.type == "cpu" else torch.float32
    model = build_skeleton(source.model_config)
    check_one_attention_mask(model.config, int(input_ids.shape[1]))
    paths = _module_paths(model)
    embedding = model.get_input_embeddings()
    materialize_module(embedding, paths[id(embedding)], source, dev)
    _rebuild_rotary(model, dev)
    rows = max(1, batch_tokens // max(1, input_ids.shape[1]))
    hidden, kwargs_by_rows = _capture_layer_inputs(model, input_ids, rows, dev, act_dtype)
    release_module(embedding)

    layers = model.model.layers
    layers_path = paths[id(layers)]
    for index, layer in enumerate(layers):
        prefix = f"{layers_path}.{index}"
        materialize_module(layer, prefix, source, dev)
        linears = {f"{prefix}.{n}": m for n, m in layer.named_modules()
                   if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1].endswith("_proj")
                   and (quantize is None or f"{prefix}.{n}" in quantize)}
        stages = _input_sets(layer, linears, hidden[0], kwargs_by_rows) if true_sequential else [list(linears)]
        for stage in stages:
            hessians = _layer_hessians(layer, {n: linears[n] for n in stage}, hidden, kwargs_by_rows, hessian_dtype)
            for name in stage:
                module = linears[name]
                if progress:
                    progress(name)
                H, count = hessians.pop(name)  # shared with q/k/v or gate/up: gptq_quantize copies it
                record = gptq_quantize(name, module.weight, H / count, bits, group_size, act_order, damp, min_zero,
                                       bias=module.bias, group_aware_order=group_aware_order)
                on_layer(name, record, module.weight.detach().cpu().clone())
                module.weight.copy_(record.dequantize(torch.float32).to(dev))
                del H
        hidden = _run_layer(layer, hidden, kwargs_by_rows, act_dtype, prefix)
        release_module(layer)


def _input_sets(layer, linears: dict[str, torch.nn.Linear], sample: torch.Tensor,
                kwargs_by_rows: dict[int, dict]) -> list[list[str]]:
    """The projections grouped by the input tensor they are fed, in execution order
    (``[[q, k, v], [o], [gate, up], [down]]`` for LLaMA), from one forward of one chunk."""
    sets: list[list[str]] = []
    last: dict = {"input": None}

    def hook_for(name: str):
        def hook(module, args):
            if args[0] is not last["input"]:
                sets.append([])
                last["input"] = args[0]
            sets[-1].append(name)
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in linears.items()]
    try:
        layer(sample.to(torch.float32), **kwargs_by_rows[sample.shape[0]])
    finally:
        for handle in handles:
            handle.remove()
    return sets


def _layer_hessians(layer, linears: dict[str, torch.nn.Linear], hidden: list[torch.Tensor],
                    kwargs_by_rows: dict[int, dict], dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, int]]:
    """``{path: (sum over calibration tokens of 2 x x.T, token count)}`` for each linear's input.

    Projections fed the same tensor (q/k/v, gate/up) share one product per chunk and one sum, so a
    LLaMA layer holds four ``[in, in]`` sums, not seven.
    """
    sums: dict[str, tuple[torch.Tensor, int]] = {}  # by the first projection that saw the input
    owner: dict[str, str] = {}  # projection -> whose sum it shares (fixed by the first chunk)
    last: dict = {"input": None, "name": None}

    def hook_for(name: str):
        def hook(module, args):
            x = args[0]
            if x is last["input"]:
                owner.setdefault(name, last["name"])
                return
            owner.setdefault(name, name)
            flat = x.reshape(-1, x.shape[-1]).to(dtype)
            total, count = sums.get(owner[name], (0, 0))
            sums[owner[name]] = (total + 2.0 * (flat.T @ flat), count + flat.shape[0])
            last["input"], last["name"] = x, owner[name]
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in linears.items()]
    try:
        for h in hidden:
            layer(h.to(torch.float32), **kwargs_by_rows[h.shape[0]])
            last["input"], last["name"] = None, None
    finally:
        for handle in handles:
            handle.remove()
    merged = {key: (total.to(torch.float64), count) for key, (total, count) in sums.items()}
    return {name: merged[owner[name]] for name in linears}
