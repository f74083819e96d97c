"""Writing an AutoGPTQ checkpoint: tensors streamed into safetensors shards (then an index) and the
config files, inside an atomic output directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from qalora_export.checkpoint.gptq_config import (
    CONFIG_FILE,
    INDEX_FILE,
    QUANTIZE_CONFIG_FILE,
    SINGLE_WEIGHTS_FILE,
    GPTQConfig,
)
from qalora_export.storage.safetensors_stream import (
    TensorSpec,
    plan_shards,
    shard_file_names,
    write_file,
    write_index,
    write_tensor_bytes,
)

# --------------------------------------------------------------------------------------- writer

DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
SHARD_METADATA = {"format": "pt"}


class CheckpointWriter:
    """Streams tensors into safetensors shards of at most ``max_shard_bytes`` (then an index).

    Each added tensor's bytes go straight to a spool file; when a shard is full, its safetensors
    file is written from the spool (header first, then the tensors in ``save_file``'s order, one
    at a time) and the spool is deleted. Memory stays at one tensor, whatever the shard size; the
    files are byte-identical to ``safetensors.torch.save_file``'s. When every tensor's dtype and
    shape are known up front, :func:`write_checkpoint` avoids the spool's second copy.

    States: open -> (add_tensor)* -> finish. Call it inside ``atomic_output_dir`` so that a
    failure leaves no partial checkpoint.
    """

    def __init__(self, directory: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self._pending: list[TensorSpec] = []
        self._pending_bytes = 0
        self._spool = None  # open file of the pending shard's tensor bytes, in arrival order
        self._spool_offsets: dict[str, int] = {}
        self._shards: list[list[TensorSpec]] = []
        self._finished = False
        self.total_bytes = 0

    def add_tensor(self, name: str, tensor: torch.Tensor) -> None:
        if self._finished:
            raise RuntimeError("CheckpointWriter.add_tensor called after finish()")
        spec = TensorSpec.of(name, tensor)
        if self._pending and self._pending_bytes + spec.nbytes > self.max_shard_bytes:
            self._flush()
        if self._spool is None:
            self._spool = open(self.directory / f".spool-{len(self._shards) + 1:05d}", "w+b")
        self._spool_offsets[name] = self._spool.tell()
        write_tensor_bytes(self._spool, tensor)
        self._pending.append(spec)
        self._pending_bytes += spec.nbytes
        self.total_bytes += spec.nbytes

    def _from_spool(self, name: str) -> torch.Tensor:
        spec = next(s for s in self._pending if s.name == name)
        self._spool.seek(self._spool_offsets[name])
        data = bytearray(self._spool.read(spec.nbytes))
        if not data:
            return torch.empty(spec.shape, dtype=spec.dtype)
        return torch.frombuffer(data, dtype=spec.dtype).reshape(spec.shape)

    def _flush(self) -> None:
        index = len(self._shards) + 1
        if self._spool is not None:
            self._spool.flush()
        write_file(self.directory / f".shard-{index:05d}.safetensors", self._pending, self._from_spool,
                   metadata=SHARD_METADATA)
        if self._spool is not None:
            self._spool.close()
            Path(self._spool.name).unlink()
        self._spool, self._spool_offsets = None, {}
        self._shards.append(self._pending)
        self._pending = []
        self._pending_bytes = 0

    def finish(self) -> list[str]:
        """Write the last shard and, for several shards, the index; return the file names."""
        if self._finished:
            raise RuntimeError("CheckpointWriter.finish called twice; the checkpoint is already written")
        if self._pending or not self._shards:
            self._flush()
        self._finished = True
        names = shard_file_names(len(self._shards), SINGLE_WEIGHTS_FILE)
        for i, fname in enumerate(names, start=1):
            (self.directory / f".shard-{i:05d}.safetensors").rename(self.directory / fname)
        if len(names) > 1:
            write_index(self.directory / INDEX_FILE, self._shards, names, self.total_bytes)
        return names


def write_checkpoint(directory: Path, specs: Sequence[TensorSpec], produce: Callable[[str], torch.Tensor],
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> tuple[list[str], int]:
    """Write the tensors ``specs`` (in this order) as shards of ``directory``, streaming.

    ``produce(name)`` is asked for each tensor when its shard reaches it (shards in order; inside
    a shard in safetensors' order), so one tensor is in memory at a time and no byte is written
    twice. Same files as :class:`CheckpointWriter` given the same tensors in the same order.

    Returns the weight file names and the total tensor bytes.
    """
    shards = plan_shards(specs, max_shard_bytes)
    names = shard_file_names(len(shards), SINGLE_WEIGHTS_FILE)
    total = 0
    for shard, fname in zip(shards, names):
        total += write_file(Path(directory) / fname, shard, produce, metadata=SHARD_METADATA)
    if len(names) > 1:
        write_index(Path(directory) / INDEX_FILE, shards, names, total)
    return names, total


def write_configs(directory: Path, model_config: dict, config: GPTQConfig, extra_meta: Optional[dict] = None) -> None:
    """``config.json`` with ``quantization_config`` and ``quantize_config.json``, as loaders expect."""
    qcfg = config.to_json()
    if extra_meta:
        qcfg["meta"] = {**qcfg["meta"], **extra_meta}
    full = {k: v for k, v in model_config.items() if k != "quantization_config"}
    full["quantization_config"] = qcfg
    full.setdefault("torch_dtype", "float16")
    (Path(directory) / CONFIG_FILE).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
    (Path(directory) / QUANTIZE_CONFIG_FILE).write_text(json.dumps(qcfg, indent=2) + "\n")
