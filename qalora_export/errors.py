"""Typed errors for qalora-export.

Every error a user can cause derives from :class:`QALoRAExportError`; its message names the
thing that is wrong (tensor, file, line), the values seen, the rule that was broken and the
flag or action that fixes it. ``cli.py`` turns them into a one-line message and exit code 2.
"""

from __future__ import annotations


class QALoRAExportError(Exception):
    """Base class of every error qalora-export raises on bad input."""


class DataError(QALoRAExportError, ValueError):
    """Training data (JSONL) is malformed or unusable."""


class CheckpointError(QALoRAExportError, ValueError):
    """A model or quantized checkpoint is missing files, fields or tensors, or is corrupt."""


class ConfigError(QALoRAExportError, ValueError):
    """A configuration value (file field or command-line flag) is missing or invalid."""


class AdapterError(QALoRAExportError, ValueError):
    """An adapter checkpoint is malformed, ambiguous, or does not match its base."""


class FoldError(QALoRAExportError, ValueError):
    """An adapter cannot be folded into the zero-points exactly as asked."""


class FormatLimitError(QALoRAExportError, ValueError):
    """The target output format cannot hold a value (zero-point range, bit width, layout)."""


class OutputExistsError(QALoRAExportError, FileExistsError):
    """The output path exists and ``--overwrite`` was not given."""


class UnsupportedModelError(QALoRAExportError, ValueError):
    """The model architecture or one of its options is not supported."""


class VerificationError(QALoRAExportError):
    """An artifact failed the verification gate (used by callers that want an exception)."""


class TrainingError(QALoRAExportError, RuntimeError):
    """Training cannot go on (the loss became NaN or inf); nothing is written."""


class OutputWriteError(QALoRAExportError, OSError):
    """Writing an output failed (disk full, file too large, no permission); nothing was written."""


class MissingExtraError(QALoRAExportError, ImportError):
    """An optional package this verb needs is not installed; the message names the pip extra."""


class RuntimeCrashError(QALoRAExportError, RuntimeError):
    """A runtime (llama.cpp, onnxruntime, GPTQModel) crashed, hung or failed in its child process.

    Attributes:
        runtime: the runtime's name, e.g. ``llama.cpp (llama-cpp-python)``.
        cause: the signal name (``SIGSEGV``), ``timeout``, ``exit N`` or ``exception``.
    """

    def __init__(self, message: str, runtime: str = "", cause: str = ""):
        super().__init__(message)
        self.runtime = runtime
        self.cause = cause
