"""What an output format is: the :class:`Format` protocol every ``formats/<name>/`` package implements.

The rest of the tool (cli, verify, inspect, plan) holds no format names: it loops over the
registry (:mod:`qalora_export.formats`) and calls these members. A format package keeps its stages
in files of their own (``spec`` layout as data, ``encode``, ``write``, ``read``, ``verify`` with
its runtime driver) and exposes one object, ``FORMAT``, that implements this protocol by
delegating to them (:class:`StagedFormat` does it by stage name); its ``__init__`` imports nothing heavy, so looping over the registry (e.g. to
detect an artifact's format) costs no runtime import.
"""

from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Protocol, Union, runtime_checkable

if TYPE_CHECKING:
    import numpy as np
    import torch

    from qalora_export.checkpoint.merged_view import MergedView
    from qalora_export.core.plain_lora import PlainLoRA
    from qalora_export.core.record import QuantizedLinear
    from qalora_export.core.weight_rows import WeightRows
    from qalora_export.extras import Requirement
    from qalora_export.runtimes.isolation import RuntimeInfo

# Weight-level tolerance: a float (relative to the layer's max |W|) or ``(model, layer name) -> allowed
# absolute error``.
WeightTolerance = Union[float, Callable[["MergedView", str], float]]


@dataclass(frozen=True)
class MemoryModel:
    """Peak memory of an export (docs/scale.md): ``baseline + max(bytes_per_weight * largest quantized
    linear's weights, float_tensor_copies * largest float tensor's bytes)``, constants fitted to
    measured peaks."""

    baseline_bytes: int
    bytes_per_weight: float
    float_tensor_copies: float


@dataclass(frozen=True)
class Handoff:
    """What a format tells the handoff bundle (docs/design.md §11) about one of its artifacts."""

    runtime: str  # the runtime it runs in, with versions: "llama.cpp (llama-cpp-python 0.3.36)"
    install: str  # the pip line that installs that runtime next to this tool
    snippet: str  # markdown: copy-paste code that runs the artifact in its runtime
    limits: tuple[str, ...]  # what the format cannot hold, or how it stores the fold
    gate: dict  # metric -> {"max": x} | {"min": x}: the runtime level's limits for verify without a base
    near_tie_factor: float  # a top-1 / greedy divergence passes when the reference margin <= this x max |dlogit|
    tokenizer_fingerprint: str  # sha256 of the artifact's tokenizer as the format stores it
    # what verify without a base cannot re-check for this artifact (listed as skipped, with the reason)
    not_rechecked: tuple[str, ...] = ()


@runtime_checkable
class Format(Protocol):
    """One output format. Tensor shapes follow PyTorch: a linear's weight is ``[out, in]``."""

    name: str  # ``merge --to NAME`` (and ``qalora-export NAME`` when ``has_verb``)
    help: str  # what it is, one line for ``--help`` ("a llama.cpp GGUF with Q4_1 blocks")
    has_verb: bool  # a verb of its own besides ``merge --to NAME``
    output_suffix: str  # of the path ``-o`` names: ".gguf" for a file, "" for a directory
    artifact: str  # what ``-o`` names, for messages: "a .gguf file", "an ONNX directory (model.onnx)"
    export_requires: tuple["Requirement", ...]  # optional packages writing needs (checked first)
    runtime_requires: tuple["Requirement", ...]  # ... and verify's runtime level
    runtime: "RuntimeInfo"  # the runtime verify_runtime drives (named when it crashes)
    weight_tolerance: WeightTolerance
    memory: MemoryModel
    holds_float_zeros: bool  # stores fractional folded zero-points exactly (no rounding)
    writes_shards: bool  # writes safetensors shards of ``max_shard_bytes`` (a plan lists them)
    writes_lora: bool  # attaches a plain LoRA to its artifacts: export_lora / verify_lora (docs/lora.md)

    def detect(self, path: Path) -> bool:
        """Whether ``path`` is an artifact of this format (cheap: file names and suffixes only)."""

    def add_options(self, parser: argparse.ArgumentParser) -> None:
        """Add this format's export options (names unique across formats: ``merge`` takes them all)."""

    def options_from_args(self, args: argparse.Namespace, progress: Callable[[str], None]) -> dict:
        """The keyword arguments of :meth:`export` from parsed options (``progress``: per-layer callback)."""

    def export(self, model: "MergedView", out: Path, **options) -> dict:
        """Write ``model`` (base with its adapter folded in) at ``out`` atomically; a JSON-able summary."""

    def read_weights(self, path: Path) -> Iterator[tuple[str, "torch.Tensor"]]:
        """Every quantized layer decoded by this project's own reader: ``(module name, float64 [out, in])``."""

    def read_weight_rows(self, path: Path) -> Iterator[tuple[str, "WeightRows"]]:
        """The same layers, decoded a row block at a time (what verify's weight level reads)."""

    def merge_metadata(self, path: Path) -> dict:
        """What the export recorded about the fold (exact or rounded, zeros moved); ``{}`` if nothing."""

    def declared_layer(self, model: "MergedView", name: str, meta: dict) -> "QuantizedLinear":
        """The record the artifact declares it holds for ``name``: the fold, rounded as ``meta`` says."""

    def verify_runtime(self, model: "MergedView", artifact: Path, prompts: list[list[int]], workdir: Path,
                       device: str) -> dict:
        """Run ``artifact`` in the real runtime against the unmerged PyTorch model; ``result["passed"]``."""

    def runtime_outputs(self, artifact: Path, prompts: list[list[int]], n_new: int,
                        workdir: Path) -> tuple[list["np.ndarray"], list[list[int]]]:
        """``artifact`` run in its real runtime, in a child process (``runtimes.isolation``): logits
        float32 ``[T, V]`` per prompt and its greedy continuation (``n_new`` tokens, fewer when the
        runtime stops at an end-of-sequence token). Needs ``runtime_requires`` only."""

    def handoff(self, artifact: Path, runtime_report: Optional[dict]) -> Handoff:
        """The bundle's format-specific facts about ``artifact``; ``runtime_report`` is its runtime
        level's result when the export ran it (floors measured there become the bundle's limits)."""

    def inspect(self, path: Path) -> dict:
        """A short JSON-able description of an artifact of this format."""

    def export_lora(self, lora: "PlainLoRA", out_dir: Path, base_artifact: Path) -> dict:
        """Write ``lora`` (a plain LoRA, ``core.plain_lora``) as the adapter file(s) this format's runtime
        loads next to ``base_artifact`` (checked to match it), into the existing directory ``out_dir``
        (the caller's atomic output); a JSON-able summary with ``files``. Only when ``writes_lora``."""

    def verify_lora(self, model: "MergedView", lora_dir: Path, base_artifact: Path, prompts: list[list[int]],
                    workdir: Path) -> dict:
        """The LoRA in ``lora_dir`` applied unmerged to ``base_artifact`` in the real runtime, against the
        unmerged PyTorch model ``model`` (base + QA-LoRA adapter); ``result["passed"]``."""

    def output_bytes(self, config: dict, bits: int, group_size: int) -> int:
        """Approximate tensor bytes of an export of a model with this ``config.json`` (for plans)."""


class StagedFormat:
    """The protocol's reading, writing and verifying members, implemented by calling the format
    package's stage modules by name, each imported on first use (so looping over the registry
    imports no container library and no runtime):

    ====================  ==================================================================
    member                stage
    ====================  ==================================================================
    ``weight_tolerance``  ``spec.WEIGHT_TOLERANCE``
    ``export``            ``write.export(model, out, **options)``
    ``read_weights``      ``read.read_weights(path)``
    ``read_weight_rows``  ``read.read_weight_rows(path)``
    ``merge_metadata``    ``read.merge_metadata(path)``; ``{}`` for a format that records none
    ``declared_layer``    ``read.declared_layer(model, name, meta)``; else the exact fold
    ``verify_runtime``    ``verify.verify_runtime(model, artifact, prompts, workdir, device=device)``
    ``inspect``           ``read.inspect(path)``
    ``runtime_outputs``   ``handoff.runtime_outputs(artifact, prompts, n_new, workdir)``
    ``handoff``           ``handoff.handoff(artifact, runtime_report)``
    ``export_lora``       ``lora.export_lora(lora, out_dir, base_artifact)`` (``writes_lora``)
    ``verify_lora``       ``lora.verify_lora(model, lora_dir, base_artifact, prompts, workdir)``
    ====================  ==================================================================

    A format subclasses it in its package's ``__init__`` and adds the members that are data or
    argument parsing (name, options, ``detect``, ``output_bytes``).
    """

    def _stage(self, module: str, name: str, default=None):
        """``<format package>.<module>.<name>`` (``default`` when the stage does not define it)."""
        return getattr(importlib.import_module(f"{type(self).__module__}.{module}"), name, default)

    @property
    def weight_tolerance(self) -> WeightTolerance:
        return self._stage("spec", "WEIGHT_TOLERANCE")

    def export(self, model: "MergedView", out: Path, **options) -> dict:
        return self._stage("write", "export")(model, out, **options)

    def read_weights(self, path: Path) -> Iterator[tuple[str, "torch.Tensor"]]:
        return self._stage("read", "read_weights")(path)

    def read_weight_rows(self, path: Path) -> Iterator[tuple[str, "WeightRows"]]:
        return self._stage("read", "read_weight_rows")(path)

    def merge_metadata(self, path: Path) -> dict:
        read = self._stage("read", "merge_metadata")
        return read(path) if read is not None else {}

    def declared_layer(self, model: "MergedView", name: str, meta: dict) -> "QuantizedLinear":
        declared = self._stage("read", "declared_layer")
        return declared(model, name, meta) if declared is not None else model.read_layer(name)[0]

    def verify_runtime(self, model: "MergedView", artifact: Path, prompts: list[list[int]], workdir: Path,
                       device: str) -> dict:
        return self._stage("verify", "verify_runtime")(model, artifact, prompts, workdir, device=device)

    def runtime_outputs(self, artifact: Path, prompts: list[list[int]], n_new: int,
                        workdir: Path) -> tuple[list["np.ndarray"], list[list[int]]]:
        return self._stage("handoff", "runtime_outputs")(artifact, prompts, n_new, workdir)

    def handoff(self, artifact: Path, runtime_report: Optional[dict]) -> Handoff:
        return self._stage("handoff", "handoff")(artifact, runtime_report)

    def inspect(self, path: Path) -> dict:
        return self._stage("read", "inspect")(path)

    writes_lora = False  # a format with a ``lora`` stage sets it (docs/lora.md)

    def export_lora(self, lora: "PlainLoRA", out_dir: Path, base_artifact: Path) -> dict:
        return self._lora_stage("export_lora")(lora, out_dir, base_artifact)

    def verify_lora(self, model: "MergedView", lora_dir: Path, base_artifact: Path, prompts: list[list[int]],
                    workdir: Path) -> dict:
        return self._lora_stage("verify_lora")(model, lora_dir, base_artifact, prompts, workdir)

    def _lora_stage(self, name: str):
        if not self.writes_lora:
            from qalora_export.errors import ConfigError

            raise ConfigError(f"the {type(self).__name__} format attaches no plain LoRA (docs/lora.md)")
        return self._stage("lora", name)


def parse_byte_size(text: str) -> int:
    """``5GB`` / ``500MiB`` / ``123456`` -> bytes (an argparse ``type``; decimal and binary units)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    value = text.strip().upper()
    number = value.rstrip("KMGTIB")
    unit = value[len(number):]
    try:
        size = int(float(number) * units[unit])
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 5GB, 500MiB or a byte count") from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the shard size must be positive")
    return size

