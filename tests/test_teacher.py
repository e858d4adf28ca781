"""The teacher placements: each offers the Teacher protocol; a replicated one gives what its model gives."""

from __future__ import annotations

from transformers import LlamaConfig, LlamaForCausalLM  # imports torch._dynamo, which sets TORCHINDUCTOR_CACHE_DIR


def test_every_teacher_placement_offers_the_teacher_protocol():
    from ted_ds.pipeline.schedule import PipelineTeacher
    from ted_ds.teacher import ReplicatedTeacher, Zero3Teacher

    placements = {cls.placement for cls in (ReplicatedTeacher, Zero3Teacher, PipelineTeacher)}
    assert placements == {"replicated", "zero3", "pipeline"}
    assert all(callable(getattr(cls, "local_parameters", None)) and "__call__" in vars(cls)
               for cls in (ReplicatedTeacher, Zero3Teacher, PipelineTeacher))


def test_a_replicated_teacher_gives_the_models_taps_and_top_k_logits_without_gradients():
    """What the trainer reads from a placed teacher, against the model itself: the tapped block's
    output, the top-k of the logits cut to the tokenizer's ids with their ids, no autograd graph, and
    the parameters it stores."""
    import torch

    from ted_ds.teacher import FrozenLM, ReplicatedTeacher

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2)).eval()
    ids = torch.randint(0, 60, (2, 5))
    with torch.no_grad():
        reference = model(ids, output_hidden_states=True)
    teacher = ReplicatedTeacher(FrozenLM(model, [1], None, True, logits_topk=4, vocab=60), torch.device("cpu"))
    out = teacher(ids)
    assert len(out.taps) == 1 and torch.allclose(out.taps[0], reference.hidden_states[1], atol=1e-6)
    values, index = reference.logits[..., :60].topk(4, dim=-1)
    assert torch.equal(out.topk_index, index) and torch.allclose(out.logits, values, atol=1e-6)
    assert not out.logits.requires_grad and not out.taps[0].requires_grad
    assert teacher.local_parameters() == sum(p.numel() for p in model.parameters())
