"""Every artifact is byte-identical to the one recorded before the redesign (artifact_hashes.json).

Quantizes the fixture (RTN w4 g32), trains nothing (a seeded random adapter), exports each format
with every byte-changing option at least once and compares sha256 per file.
"""

from __future__ import annotations

import json

import pytest

from artifact_hashes import CASES, RECORD, quantize_and_export_all


@pytest.mark.slow
def test_every_artifact_is_byte_identical_to_the_record(smollm2_float, tmp_path):
    recorded = json.loads(RECORD.read_text())
    assert set(recorded) == {"base_rtn_w4g32", "adapter", *CASES}
    hashes = quantize_and_export_all(smollm2_float, tmp_path)
    changed = {case: sorted(name for name in set(files) | set(recorded[case])
                            if files.get(name) != recorded[case].get(name))
               for case, files in hashes.items()}
    changed = {case: names for case, names in changed.items() if names}
    assert not changed, (f"artifacts differ from the record (a deliberate change re-records with "
                         f"`python tests/e2e/artifact_hashes.py --write`): {changed}")
