"""Loading weights: a student built from chosen teacher layers (reading only those), tied heads kept tied."""

from __future__ import annotations

import pytest
import torch

from ted_ds.architectures import decoder_layers
from ted_ds.errors import ConfigError
from ted_ds.weights import WeightReader, load_model, load_teacher_blocks


def test_student_from_teacher_copies_chosen_layers(tiny):
    teacher = load_model(tiny["llama_teacher"])
    before = WeightReader.process_total
    student = load_teacher_blocks(tiny["llama_teacher"], [1, 3])
    # only the two blocks, embeddings, final norm and head were read, never the whole teacher
    assert WeightReader.process_total - before == sum(p.numel() for p in student.parameters())
    assert student.config.num_hidden_layers == 2
    for s_i, t_i in ((0, 1), (1, 3)):
        for (ks, vs), (kt, vt) in zip(decoder_layers(student)[s_i].state_dict().items(),
                                      decoder_layers(teacher)[t_i].state_dict().items()):
            assert ks == kt and torch.equal(vs, vt)
    assert torch.equal(student.get_input_embeddings().weight, teacher.get_input_embeddings().weight)
    with pytest.raises(ConfigError, match="0-based"):
        load_teacher_blocks(tiny["llama_teacher"], [0, 4])


def test_loaded_models_keep_tied_heads_tied(tiny):
    """A tied head must stay the embedding's own parameter after loading (else it trains apart from
    it and the tied export silently differs from what was trained)."""
    for model in (load_model(tiny["gpt2_teacher"]), load_teacher_blocks(tiny["gpt2_teacher"], [0, 2])):
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
