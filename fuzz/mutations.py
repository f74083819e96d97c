"""Hypothesis strategies that damage files the way the real world does, for ``tests/fuzz/test_fuzz_*.py``.

Random bytes rarely get past a JSON or safetensors header, so besides byte-level damage
(:func:`byte_edits`) there are structure-aware mutations: :func:`json_edits` replaces, deletes or
adds one value anywhere in a JSON document with a nasty value (wrong type, huge, negative, NaN,
empty), and :func:`safetensors_header_edits` does the same to a safetensors header and writes
the file back with a consistent (or, sometimes, a wrong) length prefix.
"""

from __future__ import annotations

import contextlib
import copy
import json
import signal
import struct
from typing import Any, Iterator

from hypothesis import strategies as st

NASTY_VALUES = st.one_of(
    st.sampled_from([None, True, False, 0, -1, 1, 2, 3, 4, 8, 16, 31, 33, 2**31, 2**63, 2**64 + 1, -(2**63),
                     4.0, 0.5, -0.0, 1e308, float("inf"), float("nan"), "", "x", "gptq", "gptq_v2", "F16", "BF16",
                     "I32", "F32", "U8", "I64", "BOOL", "F8_E4M3", "../x", "/etc/passwd", [], {}, [0], [1, 2],
                     [[0]], [0, -1], [2**40, 2**40], {"a": 1}]),
    st.integers(-(2**70), 2**70),
    st.text(max_size=8),
    st.lists(st.integers(-4, 2**33), max_size=4),
)


@st.composite
def byte_edits(draw, data: bytes, max_edits: int = 4) -> bytes:
    """``data`` with 1..max_edits edits: bit flips, byte sets, truncation, insertion, deletion."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, max_edits))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]))
        n = len(buf)
        if op in ("flip", "set") and n:
            i = draw(st.integers(0, n - 1))
            buf[i] = buf[i] ^ (1 << draw(st.integers(0, 7))) if op == "flip" else draw(st.integers(0, 255))
        elif op == "truncate":
            del buf[draw(st.integers(0, n)):]
        elif op == "insert":
            i = draw(st.integers(0, n))
            buf[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete" and n:
            i = draw(st.integers(0, n - 1))
            del buf[i:i + draw(st.integers(1, 16))]
    return bytes(buf)


def _paths(value: Any, prefix: tuple = ()) -> Iterator[tuple]:
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, prefix + (i,))


def _nasty(draw) -> Any:
    """A fresh copy: sampled containers are shared objects, and inserting one twice (or into
    itself) would build a cycle."""
    return copy.deepcopy(draw(NASTY_VALUES))


@st.composite
def json_edits(draw, doc: Any, max_edits: int = 3) -> Any:
    """A deep copy of ``doc`` with 1..max_edits values replaced, keys deleted or keys added."""
    doc = json.loads(json.dumps(doc))
    for _ in range(draw(st.integers(1, max_edits))):
        paths = list(_paths(doc))
        path = draw(st.sampled_from(paths))
        op = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if not path:
            if op == "replace":
                doc = _nasty(draw)
            continue
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        last = path[-1]
        if op == "replace":
            parent[last] = _nasty(draw)
        elif op == "delete":
            del parent[last]
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(["bits", "group_size", "dtype", "shape", "data_offsets", "__metadata__",
                                         "r", "lora_alpha", "pooling", "extra"]))] = _nasty(draw)
    return doc


def json_dumps_loose(value: Any) -> bytes:
    """``json.dumps`` allowing NaN/inf (Python writes them as bare tokens, as some tools do)."""
    return json.dumps(value, allow_nan=True).encode()


def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    """(header dict, data section) of a well-formed safetensors file."""
    (n,) = struct.unpack_from("<Q", data, 0)
    return json.loads(data[8:8 + n]), data[8 + n:]


def join_safetensors(header: Any, body: bytes, length_delta: int = 0) -> bytes:
    raw = json_dumps_loose(header)
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", max(0, len(raw) + length_delta)) + raw + body


@st.composite
def safetensors_header_edits(draw, data: bytes) -> bytes:
    """A safetensors file whose header had 1..3 values replaced, deleted or added."""
    header, body = split_safetensors(data)
    header = draw(json_edits(header))
    delta = draw(st.sampled_from([0, 0, 0, 0, -1, 1, 8, -8, 2**40]))
    return join_safetensors(header, body, delta)


class Hang(Exception):
    """Raised by :func:`deadline` when a reader runs past its time limit (a hang is a finding)."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise :class:`Hang` in the main thread if the block runs longer than ``seconds``."""

    def fire(signum, frame):
        raise Hang(f"the reader ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
