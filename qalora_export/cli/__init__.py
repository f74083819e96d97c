"""The ``qalora-export`` command line: the only package that prints or exits.

``parser`` builds the sub-commands (each format adds its own export options), ``verbs`` runs them,
``terminal`` is what they print with.

Exit codes: 0 success; 1 verification failed (the gate); 2 bad input or a refused operation
(a typed :class:`QALoRAExportError`, message on stderr).

The console is quiet by default (:mod:`qalora_export.console`): our lines, progress bars and tables on the
terminal, third-party output (GPTQModel, transformers, torch.compile, native runtimes) in a log
file whose path is printed at the end; ``-v`` shows it live instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

from qalora_export.cli import terminal
from qalora_export.cli.parser import build_parser
from qalora_export.cli.terminal import EXIT_BAD_INPUT, EXIT_OK, EXIT_VERIFY_FAILED, note
from qalora_export.console import default_log_path, quiet_console
from qalora_export.errors import QALoRAExportError

__all__ = ["EXIT_BAD_INPUT", "EXIT_OK", "EXIT_VERIFY_FAILED", "build_parser", "main"]


def _log_path(args) -> Path:
    if args.log_file is not None:
        return args.log_file
    if args.command == "demo":
        return Path(args.workdir) / "demo.log"
    return default_log_path(args.command)


def main(argv: Optional[Sequence[str]] = None) -> int:
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, min(2, os.cpu_count() or 1))))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    with quiet_console(_log_path(args), verbose=args.verbose) as console:
        terminal.set_console(console)
        try:
            return _run(args)
        finally:
            terminal.set_console(None)
            log = console.log_path
            if log is not None and log.is_file() and log.stat().st_size > 0:
                print(f"log: {log} (third-party messages; -v shows them live)", file=console.err, flush=True)


def _run(args) -> int:
    try:
        return args.func(args)
    except QALoRAExportError as exc:
        note(f"qalora-export {args.command}: error: {exc}")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        note("interrupted; no partial output was left")
        return 130
