"""storage.memory: glibc's mmap threshold can be fixed (Linux), and elsewhere the call is a no-op."""

from __future__ import annotations

import subprocess
import sys

from qalora_export.storage.memory import fix_malloc_mmap_threshold


def test_fixing_the_threshold_succeeds_on_glibc_and_never_raises():
    # in a child process: the setting is process-wide and the test runner's allocator is left alone
    code = "from qalora_export.storage.memory import fix_malloc_mmap_threshold as f; print(f(), f(4 << 20))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    if sys.platform.startswith("linux"):
        assert out == ["True", "True"]
    else:
        assert out == ["False", "False"]
    assert callable(fix_malloc_mmap_threshold)
