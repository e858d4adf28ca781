"""bench/profile_bench.py's breakdown of a profiled step, on events whose answer is known."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from bench.profile_bench import breakdown, enclosing, phase_of


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


def event(name: str, start: float, parent=None):
    return SimpleNamespace(name=name, cpu_parent=parent, time_range=SimpleNamespace(start=start))


def test_an_op_of_another_thread_belongs_to_the_phase_that_spans_it():
    """On a GPU the backward's ops run on the autograd engine's thread, under no annotation of their own."""
    spans = [(0.0, 10.0, "forward"), (2.0, 4.0, "loss"), (10.0, 20.0, "backward"), (20.0, 30.0, "step")]
    forward = event("forward", 0.0)
    assert enclosing(event("aten::mm", 1.0, event("aten::linear", 1.0, forward)), spans) == ("forward", "aten::linear")
    assert phase_of(enclosing(event("aten::mm", 12.0), spans)) == "backward"  # no parent: by time
    assert phase_of(enclosing(event("aten::exp", 3.0), spans)) == "loss"  # the innermost span
    assert enclosing(event("aten::add_", 40.0), spans) == ()  # after every phase: outside
    assert enclosing(event("backward", 10.0), spans) == ()  # an annotation is its own phase


def test_on_a_device_an_annotation_own_time_is_kernels_of_no_op():
    b = breakdown([("step", (), 3.0), ("aten::mm", ("forward",), 1.0)], on_device=True)
    assert b["kind"] == pytest.approx({"kernels of no op": 0.75, "GEMM": 0.25})
