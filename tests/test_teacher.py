"""The teacher placements: each offers the Teacher protocol."""

from __future__ import annotations


def test_every_teacher_placement_offers_the_teacher_protocol():
    from ted_ds.pipeline.schedule import PipelineTeacher
    from ted_ds.teacher import ReplicatedTeacher, Zero3Teacher

    placements = {cls.placement for cls in (ReplicatedTeacher, Zero3Teacher, PipelineTeacher)}
    assert placements == {"replicated", "zero3", "pipeline"}
    assert all(callable(getattr(cls, "local_parameters", None)) and "__call__" in vars(cls)
               for cls in (ReplicatedTeacher, Zero3Teacher, PipelineTeacher))
