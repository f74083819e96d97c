"""``qalora-export lora``: a QA-LoRA adapter exported as a plain LoRA, for runtimes that serve adapters
unmerged on the unchanged base (docs/lora.md).

1. The pooling groups are resolved (``core.plain_lora``): consecutive columns from the adapter alone;
   quantization groups from the GPTQ base's ``g_idx`` (``base_dir``), or, without a base, from the
   adapter's own ``adapter_config.json`` when our trainer marked it PEFT-loadable (``use_qalora``: it
   does so only on a base whose groups are consecutive); otherwise an :class:`AdapterError` asks for it.
2. The plain factors are computed in float64, stored as float32/float16, and every layer's stored delta is
   checked against the QA-LoRA delta (float64, the rounding bound of ``check_layer_delta``); a failure
   is a :class:`VerificationError` and nothing is written.
3. The PEFT folder is written atomically, together with, for each base artifact given in ``attach``,
   the adapter file of the format that claims it (``Format.export_lora``, through the registry).
4. :func:`verify_lora_runtimes` applies the written LoRA in each real runtime (``Format.verify_lora``)
   in a child process (``runtimes.isolation``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch

from qalora_export.checkpoint.adapter_files import ADAPTER_CONFIG, load_adapter
from qalora_export.checkpoint.gptq import GPTQCheckpoint
from qalora_export.checkpoint.merged_view import MergedView
from qalora_export.checkpoint.plain_lora_files import write_plain_lora
from qalora_export.core.adapter import QALoRAAdapter, pooling_factor
from qalora_export.core.plain_lora import (
    PlainLoRA,
    PlainLoRALayer,
    check_convertible,
    check_layer_delta,
    column_pools,
    plain_factors,
    store,
)
from qalora_export.errors import AdapterError, ConfigError, RuntimeCrashError, VerificationError
from qalora_export.extras import require
from qalora_export.formats import all_formats
from qalora_export.formats.protocol import Format
from qalora_export.runtimes.isolation import call_isolated
from qalora_export.storage.atomic import atomic_output_dir, read_json

# A runtime check that runs longer than this is taken for a hang (tiny models: seconds; SmolLM2: minutes).
DEFAULT_RUNTIME_TIMEOUT_S = 3600.0


def lora_format(base_artifact: Path) -> Format:
    """The registered format that attaches LoRAs and claims ``base_artifact`` (its ``detect``).

    Raises:
        ConfigError: no such format.
    """
    for fmt in all_formats():
        if fmt.writes_lora and fmt.detect(Path(base_artifact)):
            return fmt
    kinds = ", ".join(f"{f.artifact} ({f.name})" for f in all_formats() if f.writes_lora)
    raise ConfigError(f"{base_artifact}: no format attaches a LoRA to it; expected one of: {kinds}")


def _geometry(adapter: QALoRAAdapter, adapter_dir: Path,
              base: Optional[GPTQCheckpoint]) -> tuple[Callable[[str], tuple[int, Optional[torch.Tensor]]], str]:
    """``name -> (in_features, g_idx or None)`` and where the pooling groups come from."""
    if base is not None:
        def from_base(name: str) -> tuple[int, Optional[torch.Tensor]]:
            layer = base.read_layer(name, with_codes=False)
            return layer.in_features, layer.g_idx
        return from_base, f"the GPTQ base {base.directory} (g_idx)"
    if not adapter.pool_group_size:
        raise AdapterError(f"{adapter_dir} does not record its pooling group size, so the layers' input widths are "
                           f"unknown; pass the GPTQ base it was trained on (--base BASE)")
    p = adapter.pool_group_size
    contiguous = bool(read_json(Path(adapter_dir) / ADAPTER_CONFIG, AdapterError).get("use_qalora"))
    if adapter.pool_groups == "quantization" and not contiguous:
        raise AdapterError(
            f"{adapter_dir} pools over its base's quantization groups and does not record that they are consecutive "
            f"(an act-order base permutes them); pass the GPTQ base it was trained on (--base BASE)")

    def from_adapter(name: str) -> tuple[int, Optional[torch.Tensor]]:
        in_features = adapter.layers[name].pooled_features * p
        return in_features, torch.arange(in_features, dtype=torch.int64) // p
    source = ("consecutive columns (pool_groups: consecutive)" if adapter.pool_groups == "consecutive" else
              "consecutive quantization groups (adapter_config.json use_qalora: the trainer saw a contiguous base)")
    return from_adapter, source


def build_plain_lora(adapter: QALoRAAdapter, adapter_dir: Path, base: Optional[GPTQCheckpoint],
                     dtype: str = "float32", progress: Optional[Callable[[str], None]] = None) -> tuple[PlainLoRA, dict]:
    """The stored plain LoRA of ``adapter`` and its weight-level check (``{"passed", "layers", ...}``).

    Raises:
        AdapterError: an integer-zero adapter, or pooling groups that cannot be resolved (module docstring).
        FormatLimitError: a factor overflows ``dtype``.
    """
    check_convertible(adapter)
    geometry, source = _geometry(adapter, adapter_dir, base)
    layers, per_layer, factors = {}, {}, set()
    for name in adapter.layers:
        in_features, g_idx = geometry(name)
        pools = column_pools(adapter, name, in_features, g_idx)
        a_plain, b = plain_factors(adapter, name, pools)
        stored = PlainLoRALayer(store(a_plain, dtype, f"{name}.lora_A"), store(b, dtype, f"{name}.lora_B"))
        per_layer[name] = check_layer_delta(adapter, name, stored, pools, dtype)
        factors.add(pooling_factor(adapter.pooling, in_features, adapter.layer_pool_group_size(name, in_features)))
        layers[name] = stored
        if progress:
            progress(name)
    failed = sorted(n for n, r in per_layer.items() if not r["passed"])
    checks = {"passed": not failed, "layers": len(per_layer), "failed_layers": failed,
              "max_abs_error": max((r["max_abs_error"] for r in per_layer.values()), default=0.0),
              "max_abs_delta": max((r["max_abs_delta"] for r in per_layer.values()), default=0.0),
              "min_margin": min((r["allowed_margin"] for r in per_layer.values()), default=0.0),
              "rule": f"|s B A_plain - s k (B A)[:, a(i)]| <= the {dtype} rounding bound of each element "
                      f"(core/plain_lora.py check_layer_delta), float64"}
    provenance = {"source_adapter": str(adapter_dir), "pooling": adapter.pooling,
                  "pooling_factors_k": sorted(factors), "pool_group_size": adapter.pool_group_size,
                  "pool_groups": adapter.pool_groups, "pool_groups_from": source,
                  "base_fingerprint": adapter.base_fingerprint,
                  "rounding": f"float64 factors rounded to nearest {dtype}"}
    lora = PlainLoRA(layers, adapter.rank, adapter.alpha, list(adapter.target_modules), dtype, provenance)
    return lora, checks


def export_lora(adapter_dir: Path, out: Path, *, base_dir: Optional[Path] = None, attach: Optional[Path] = None,
                pooling: Optional[str] = None, dtype: str = "float32", overwrite: bool = False,
                progress: Optional[Callable[[str], None]] = None) -> dict:
    """Write the plain LoRA of ``adapter_dir`` at ``out`` (PEFT folder, plus the file of the format that
    claims ``attach``), atomically; a JSON-able summary.

    Raises:
        VerificationError: a layer's stored delta is not the QA-LoRA delta (nothing written).
        AdapterError, ConfigError, FormatLimitError, OutputExistsError, OutputWriteError: bad input/output.
    """
    adapter = load_adapter(Path(adapter_dir), pooling=pooling)
    base = None
    if base_dir is not None:
        base = MergedView.open(base_dir, adapter_dir, pooling=pooling).base  # checks modules and fingerprint
    fmt = lora_format(attach) if attach is not None else None
    if fmt is not None:
        require(fmt.export_requires, f"a {fmt.name} LoRA")
    lora, checks = build_plain_lora(adapter, Path(adapter_dir), base, dtype, progress)
    if not checks["passed"]:
        raise VerificationError(f"the plain LoRA's delta differs from the QA-LoRA delta beyond {dtype} rounding in "
                                f"{len(checks['failed_layers'])} layer(s) (first: {checks['failed_layers'][0]}); "
                                f"nothing was written")
    summary = {"output": str(out), "rank": lora.rank, "alpha": lora.alpha, "dtype": dtype, "layers": len(lora.layers),
               "pooling": adapter.pooling, "pool_groups_from": lora.provenance["pool_groups_from"],
               "weight_check": checks}
    with atomic_output_dir(Path(out), overwrite=overwrite) as tmp:
        files = write_plain_lora(lora, tmp, str(base_dir or ""), checks)
        if fmt is not None:
            attached = fmt.export_lora(lora, tmp, Path(attach))
            files += attached.get("files", [])
            summary[f"{fmt.name}_lora"] = attached
    summary["files"] = files
    return summary


def verify_lora_runtimes(adapter_dir: Path, lora_dir: Path, base_dir: Path, attach: Optional[Path] = None,
                         pooling: Optional[str] = None, timeout: Optional[float] = DEFAULT_RUNTIME_TIMEOUT_S,
                         progress: Optional[Callable[[str], None]] = None) -> dict:
    """Run the written LoRA in the runtime of ``base_dir``'s format (PEFT on the GPTQ base) and, with
    ``attach``, of its format (llama.cpp ``lora_path=``), each in a child process; ``{"passed", name: result}``."""
    from qalora_export.verify import fixed_prompts

    model = MergedView.open(base_dir, adapter_dir, pooling=pooling)
    prompts = fixed_prompts(model.tokenizer_dir)
    report: dict = {"passed": True}
    for artifact in [Path(base_dir)] + ([Path(attach)] if attach is not None else []):
        fmt = lora_format(artifact)
        require(fmt.runtime_requires, f"verify of a plain LoRA in {fmt.runtime.name}")
        if progress:
            progress(fmt.runtime.name)
        try:
            result = call_isolated(f"{__name__}:runtime_check",
                                   {"fmt": fmt.name, "base_dir": base_dir, "adapter_dir": adapter_dir, "pooling": pooling,
                                    "lora_dir": lora_dir, "artifact": artifact, "prompts": prompts},
                                   fmt.runtime, timeout=timeout)
        except RuntimeCrashError as exc:
            result = {"runtime": fmt.runtime.name, "passed": False, "error": str(exc), "cause": exc.cause}
        report[fmt.name] = result
        report["passed"] = report["passed"] and bool(result.get("passed"))
    return report


def runtime_check(fmt: str, base_dir: str, adapter_dir: str, pooling: Optional[str], lora_dir: str, artifact: str,
                  prompts: list[list[int]]) -> dict:
    """In the child process: ``Format.verify_lora`` of the registered format ``fmt``."""
    from qalora_export.formats import get_format

    model = MergedView.open(base_dir, adapter_dir, pooling=pooling)
    with tempfile.TemporaryDirectory(prefix="qalora-lora-") as workdir:
        return get_format(fmt).verify_lora(model, Path(lora_dir), Path(artifact), prompts, Path(workdir))
