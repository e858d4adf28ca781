"""Which teacher layer is tapped against which student layer, and the mismatches refused."""

from __future__ import annotations

import pytest

from ted_ds.errors import ConfigError
from ted_ds.taps import tap_pairs


def test_tap_mapping_and_its_errors():
    class D:
        pairs = None
        teacher_every = None
        student_every = None

    d = D()
    assert tap_pairs(d, 12, 6) == [(2, 1), (4, 2), (6, 3), (8, 4), (10, 5), (12, 6)]
    d.teacher_every, d.student_every = 4, 2
    assert tap_pairs(d, 12, 6) == [(4, 2), (8, 4), (12, 6)]
    d.teacher_every, d.student_every = 5, 2  # 5, 10, 12 vs 2, 4, 6: equal counts, last block included
    assert tap_pairs(d, 12, 6) == [(5, 2), (10, 4), (12, 6)]
    d.teacher_every, d.student_every = 3, 3
    with pytest.raises(ConfigError, match=r"tap mismatch.*\[3, 6, 9, 12\].*\[3, 6\]"):
        tap_pairs(d, 12, 6)
    d.teacher_every = d.student_every = None
    d.pairs = [[12, 7]]
    with pytest.raises(ConfigError, match="out of range"):
        tap_pairs(d, 12, 6)
