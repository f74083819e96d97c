"""pytest plugin: record which test constructs which typed error (for ``docs/errors.md``).

    PYTHONPATH=fuzz .venv/bin/python -m pytest -p error_sites_plugin tests/ ...

writes ``$QALORA_ERROR_SITES`` (default ``error_sites.json``): a list of
``[file, line, class, test nodeid]`` — the source line where a ``QALoRAExportError`` subclass was
constructed while that test ran. ``tests/test_errors_doc.py --write --sites FILE`` turns it into
the catalogue's "covered by" column.
"""

from __future__ import annotations

import json
import os
import sys

_records: set = set()
_current = {"test": None}


def pytest_configure(config):
    from qalora_export import errors

    base = errors.QALoRAExportError
    root = os.path.dirname(os.path.dirname(os.path.abspath(errors.__file__)))

    def __init__(self, *args, **kwargs):
        frame = sys._getframe(1)
        if _current["test"] and frame.f_code.co_filename.startswith(root):
            rel = os.path.relpath(frame.f_code.co_filename, root)
            _records.add((rel, frame.f_lineno, type(self).__name__, _current["test"]))
        super(base, self).__init__(*args, **kwargs)

    base.__init__ = __init__


def pytest_runtest_setup(item):
    _current["test"] = item.nodeid


def pytest_runtest_teardown(item):
    _current["test"] = None


def pytest_unconfigure(config):
    path = os.environ.get("QALORA_ERROR_SITES", "error_sites.json")
    with open(path, "w") as f:
        json.dump(sorted(_records), f)
