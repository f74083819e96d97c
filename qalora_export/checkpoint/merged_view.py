"""A view of a quantized base with an adapter folded in, read lazily one layer at a time (nothing is
merged on disk or in memory until a format asks for a layer).

This is what every format's export consumes: it knows the base checkpoint and the fold, and nothing
of output formats. Zero-points of the records it yields are float64 and may be fractional;
each format decides, in its own package, whether it holds them exactly.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from qalora_export.checkpoint.adapter_files import load_adapter
from qalora_export.checkpoint.gptq import GPTQCheckpoint
from qalora_export.core.adapter import QALoRAAdapter
from qalora_export.core.fold import FoldStats, effective_weight, effective_weight_rows, fold_into_zero_points
from qalora_export.core.record import QuantizedLinear
from qalora_export.errors import AdapterError


class MergedView:
    """``base`` (an AutoGPTQ checkpoint) with ``adapter`` (or none) folded into its zero-points.

    Attributes:
        base: the checkpoint reader; ``base.directory`` also holds the tokenizer files.
        adapter: the adapter, or None for an already merged checkpoint / the plain base.
        model_config: the base's ``config.json`` without ``quantization_config``.
    """

    def __init__(self, base: GPTQCheckpoint, adapter: Optional[QALoRAAdapter] = None,
                 check_fingerprint: bool = True, defer_fingerprint: bool = False):
        self.base = base
        self._fingerprint_check: Optional[_FingerprintCheck] = None
        self.adapter = adapter
        self._last_layer: Optional[QuantizedLinear] = None
        self.model_config = {k: v for k, v in base.model_config.items() if k != "quantization_config"}
        if adapter is not None:
            unknown = sorted(set(adapter.layers) - set(base.quantized_modules))
            if unknown:
                raise AdapterError(
                    f"the adapter adapts {len(unknown)} module(s) the base does not quantize "
                    f"(first: {unknown[0]}); it was trained on another model"
                )
            if check_fingerprint and adapter.base_fingerprint:
                if defer_fingerprint and isinstance(adapter.base_fingerprint, str):
                    self._fingerprint_check = _FingerprintCheck(self)
                else:
                    self._check_fingerprint()

    def _check_fingerprint(self, cancel: Optional[threading.Event] = None) -> None:
        recorded = self.adapter.base_fingerprint
        if not isinstance(recorded, str) or not self.base.matches_fingerprint(recorded, cancel):
            actual = self.base.fingerprint()
            raise AdapterError(
                f"the adapter was trained on a base with fingerprint {recorded}, "
                f"but {self.base.directory} has {actual}: it is a different quantized base "
                f"(other weights, bits or group size). Use the base the adapter was trained on"
            )

    @contextlib.contextmanager
    def fingerprint_checked(self) -> Iterator[None]:
        """Run the body while a deferred base-fingerprint check (``defer_fingerprint=True``) hashes
        the base in a background thread, and wait for it at the end: a mismatch raises the same
        :class:`AdapterError` as the immediate check, also when the body failed first (a wrong base
        often fails the fold too; the mismatch is the error to report). Put it inside the atomic
        output, so that nothing is renamed into place before the check passed. Without a deferred
        check (checked already, none recorded, no adapter) it only runs the body."""
        check, self._fingerprint_check = self._fingerprint_check, None
        if check is None:
            yield
            return
        check.start()
        try:
            yield
        except BaseException as exc:
            if isinstance(exc, Exception):
                mismatch = check.result(cancel=False)
                if isinstance(mismatch, AdapterError):
                    raise mismatch from exc
            check.result(cancel=True)
            raise
        error = check.result(cancel=False)
        if error is not None:
            raise error

    @classmethod
    def open(cls, base_dir: Path | str, adapter_dir: Path | str | None = None,
             pooling: Optional[str] = None, defer_fingerprint: bool = False) -> "MergedView":
        """``defer_fingerprint``: check the adapter's base fingerprint (a full read of the base)
        later, in the background, inside :meth:`fingerprint_checked`, which the caller's export
        must then run (every format's ``write.export`` does)."""
        base = GPTQCheckpoint(base_dir)
        adapter = load_adapter(Path(adapter_dir), pooling=pooling) if adapter_dir is not None else None
        return cls(base, adapter, defer_fingerprint=defer_fingerprint)

    @property
    def bits(self) -> int:
        return self.base.config.bits

    @property
    def group_size(self) -> int:
        return self.base.config.group_size

    @property
    def quantized_modules(self) -> list[str]:
        return self.base.quantized_modules

    def read_layer(self, name: str, with_codes: bool = True) -> tuple[QuantizedLinear, FoldStats]:
        """The layer with the adapter folded in (float64 zeros ``[G, out]``) and the fold's stats.

        ``with_codes=False``: codes not read (see ``GPTQCheckpoint.read_layer``); the fold never
        changes them, so a converter that copies the packed codes needs nothing more.
        """
        layer = self._base_layer(name) if with_codes else self.base.read_layer(name, with_codes=False)
        if self.adapter is None:
            return layer, FoldStats(name, 0.0, True)
        return fold_into_zero_points(layer, self.adapter)

    def iter_layers(self) -> Iterator[tuple[QuantizedLinear, FoldStats]]:
        for name in self.quantized_modules:
            yield self.read_layer(name)

    def reference_weight(self, name: str) -> torch.Tensor:
        """The unmerged effective weight ``W_hat + dW`` (float64 ``[out, in]``), computed without the fold."""
        return effective_weight(self._base_layer(name), self.adapter)

    def reference_weight_rows(self, name: str) -> Callable[[Optional[slice]], torch.Tensor]:
        """:meth:`reference_weight` a row block at a time: ``rows -> float64 [len(rows), in]``."""
        return effective_weight_rows(self._base_layer(name), self.adapter)

    def layer_shape(self, name: str) -> tuple[int, int]:
        """``(out, in)`` of the quantized layer ``name``."""
        return tuple(self._base_layer(name).codes.shape)

    def _base_layer(self, name: str) -> QuantizedLinear:
        """The base record of ``name``, kept for the next call: verify asks for a layer's folded
        record and its reference weight in turn, and each would otherwise re-read and unpack it.
        One layer is held, so memory stays bounded."""
        if self._last_layer is None or self._last_layer.name != name:
            self._last_layer = self.base.read_layer(name)
        return self._last_layer

    def other_tensor_names(self) -> list[str]:
        return self.base.other_tensor_names()

    def read_tensor(self, name: str, rows: Optional[slice] = None) -> torch.Tensor:
        return self.base.read_tensor(name, rows)

    @property
    def tokenizer_dir(self) -> Path:
        return self.base.directory


class _FingerprintCheck:
    """:meth:`MergedView._check_fingerprint` in a daemon thread (hashlib and file reads release the
    GIL, so it overlaps the export's copies); :meth:`result` joins it and returns the error, if any."""

    def __init__(self, model: MergedView):
        self._model = model
        self._cancel = threading.Event()
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="qalora-fingerprint", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            self._model._check_fingerprint(self._cancel)
        except BaseException as exc:  # handed to the caller by result()
            self._error = exc

    def result(self, cancel: bool) -> Optional[BaseException]:
        if cancel:
            self._cancel.set()
        self._thread.join()
        return self._error


@contextlib.contextmanager
def single_threaded_torch() -> Iterator[None]:
    """Run torch on one thread inside: a merge's tensor ops are small (``[G, out]`` folds and zero
    decoding) and between reads and writes, and intra-op threads only contend (7x slower folds
    measured on 2 busy cores; docs/scale.md). Every converter's export runs inside it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
