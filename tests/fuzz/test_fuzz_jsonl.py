"""Fuzzing ``data.read_jsonl`` (training data).

Invariants: only ``DataError`` comes out (no other exception, no hang); valid records written
as JSONL read back exactly (nothing silently altered, dropped or merged); whatever is accepted
is a valid record. Coverage-guided counterpart: ``fuzz/run.py jsonl``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "fuzz"))
import harness  # noqa: E402
from fuzz_common import tpl, ws  # noqa: E402,F401  (module fixtures)
import mutations  # noqa: E402
import seeds  # noqa: E402

from qalora_export.training.examples import validate_example  # noqa: E402
from qalora_export.errors import DataError  # noqa: E402

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), print_blob=True)

TEXT = st.text(min_size=1, max_size=20).filter(lambda t: t.strip())
INSTRUCTION = st.fixed_dictionaries({"instruction": TEXT, "output": TEXT},
                                    optional={"input": st.one_of(st.none(), st.text(max_size=10))})
MESSAGES = st.builds(
    lambda system, turns: {"messages": ([{"role": "system", "content": system}] if system else [])
                           + [m for u, a in turns for m in ({"role": "user", "content": u},
                                                            {"role": "assistant", "content": a})]},
    st.one_of(st.none(), TEXT), st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=3))


def run(ws, data: bytes):
    with mutations.deadline(10):
        return harness.run_one("jsonl", data, Path("."), ws)


@FUZZ
@given(records=st.lists(st.one_of(INSTRUCTION, MESSAGES), min_size=1, max_size=5),
       ensure_ascii=st.booleans(), crlf=st.booleans(), bom=st.booleans())
def test_valid_records_read_back_exactly(ws, records, ensure_ascii, crlf, bom):
    text = "".join(json.dumps(r, ensure_ascii=ensure_ascii) + ("\r\n" if crlf else "\n") for r in records)
    result = run(ws, (b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    assert not isinstance(result, Exception), result
    assert result["records"] == records


@FUZZ
@given(data=st.data(), which=st.integers(0, len(seeds.JSONL_SEEDS) - 1))
def test_byte_damage_gives_only_data_errors(ws, data, which):
    result = run(ws, data.draw(mutations.byte_edits(seeds.JSONL_SEEDS[which])))
    if not isinstance(result, DataError):
        for record in result["records"]:
            validate_example(record)


@FUZZ
@given(data=st.data(), record=st.one_of(INSTRUCTION, MESSAGES))
def test_structural_damage_gives_only_data_errors(ws, data, record):
    damaged = data.draw(mutations.json_edits(record))
    result = run(ws, mutations.json_dumps_loose(damaged) + b"\n")
    if not isinstance(result, DataError):
        assert result["records"] == [damaged]


@pytest.mark.parametrize("line", [
    b"[" * 100_000 + b"]" * 100_000,                 # nesting beyond the recursion limit
    b'{"instruction": "a", "output": ' + b"9" * 5000 + b"}",  # integer over the digit limit
    b'{"instruction": "a\\ud800", "output": "b"}',  # unpaired surrogate: no tokenizer can encode it
    b'{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": "d"}',  # blank line inside
    b"\xff\xfe{}",
])
def test_hostile_lines_are_data_errors(ws, line):
    assert isinstance(run(ws, line), DataError)
