"""bench/profile_bench.py's breakdown of a profiled step, on events whose answer is known."""

from __future__ import annotations

import pytest

from bench.profile_bench import breakdown


def test_each_op_counts_in_its_innermost_phase_and_its_kind():
    events = [("aten::mm", ("forward", "teacher", "aten::linear"), 30.0),  # teacher inside forward: teacher
              ("aten::mm", ("forward", "aten::linear"), 20.0),
              ("aten::_scaled_dot_product_flash_attention_for_cpu", ("forward",), 5.0),
              ("aten::log_softmax", ("forward", "loss"), 10.0),
              ("forward", (), 15.0),  # the annotation's own time: Python and ZeRO-3's hooks
              ("c10d::allreduce_", ("step",), 10.0),
              ("aten::add_", (), 10.0)]  # outside any phase
    b = breakdown(events)
    assert b["phase"] == pytest.approx({"teacher": 0.3, "forward": 0.4, "loss": 0.1, "step": 0.1, "outside": 0.1})
    assert b["kind"] == pytest.approx({"GEMM": 0.5, "attention": 0.05, "other ops": 0.2, "Python and hooks": 0.15,
                                       "communication": 0.1})
    assert b["total_s"]["self_time"] == pytest.approx(100e-6)
