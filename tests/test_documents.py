"""Document-aware packing (data.document_attention): positions and mask by hand, and a packed
document gives the same logits and taps as the document run alone — student and replicated teacher,
LLaMA and GPT-2, fp32.  The ZeRO-3 and pipeline teachers are checked in tests/harness/mp/pipeline_check.py."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers.masking_utils import find_packed_sequence_indices  # sets TORCHINDUCTOR_CACHE_DIR: import early

from harness.tiny import base_config, packed_documents, span_difference, write_config
from ted_ds.architectures import load_hf_config
from ted_ds.config import load_run_config
from ted_ds.documents import DocumentAttention, document_positions, for_model
from ted_ds.engine import DeepSpeedSettings, place_frozen
from ted_ds.filters import FilterBank
from ted_ds.taps import TappedLM
from ted_ds.weights import load_model

ATOL = 1e-5


def test_positions_and_mask_by_hand():
    eos = 2
    ids = torch.tensor([[5, 6, 2, 7, 2, 2, 8, 9],  # mid-document start, two EOS in a row, a document at the end
                        [2, 5, 6, 7, 8, 9, 4, 2]])  # the window starts on the EOS of an earlier document
    positions, mask = document_positions(ids, eos)
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], [0, 0, 1, 2, 3, 4, 5, 6]]
    documents = [[0, 0, 0, 1, 1, 2, 3, 3], [0, 1, 1, 1, 1, 1, 1, 1]]
    assert mask.shape == (2, 1, 8, 8) and mask.dtype == torch.float32
    for b in range(2):
        for i in range(8):
            for j in range(8):
                seen = j <= i and documents[b][i] == documents[b][j]
                assert mask[b, 0, i, j].item() == (0.0 if seen else torch.finfo(torch.float32).min)
    # the same documents as transformers' own packed-sequence detection finds from these positions
    assert find_packed_sequence_indices(positions).tolist() == documents
    # the mask comes in the model's compute dtype; FlashAttention-2 gets the positions alone
    assert document_positions(ids, eos, torch.bfloat16)[1].min().item() == torch.finfo(torch.bfloat16).min
    assert document_positions(ids, eos, torch.bfloat16)[1].dtype == torch.bfloat16
    fa2 = DocumentAttention(eos, torch.bfloat16, "flash_attention_2")(ids)
    assert set(fa2) == {"position_ids"} and torch.equal(fa2["position_ids"], positions)
    assert set(DocumentAttention(eos, torch.float32, "sdpa")(ids)) == {"position_ids", "attention_mask"}


def with_attention(model_dir: str, impl: str, out) -> str:
    """A copy of ``model_dir`` whose config.json asks for attention ``impl``."""
    if impl == "sdpa":
        return model_dir
    shutil.copytree(model_dir, out)
    config = json.load(open(out / "config.json"))
    config["attn_implementation"] = impl
    json.dump(config, open(out / "config.json", "w"))
    if getattr(load_hf_config(str(out)), "_attn_implementation", None) != impl:
        pytest.skip(f"this transformers ignores attn_implementation in config.json (the model runs sdpa, not {impl})")
    return str(out)


@pytest.mark.parametrize("kind,impl", [("llama", "sdpa"), ("gpt2", "sdpa"), ("llama", "flex_attention")])
def test_a_packed_document_equals_the_document_alone(tiny, kind, impl, tmp_path):
    """Logits and taps of each document in a packed window — the first one cut by the window's start,
    the second whole, each with its EOS — equal those of the document run alone: in the student (with
    filters on its taps) and in the replicated teacher, under the dense mask (sdpa) and a FlexAttention
    block mask.  The logits at an EOS, which predict the next document's first token (its target is
    kept), come from the finished document alone.  Without document attention the same comparison is
    far off: the check can see the difference."""
    teacher = with_attention(tiny[f"{kind}_teacher"], impl, tmp_path / "teacher")
    eos = json.load(open(f"{tiny[f'{kind}_data']}/manifest.json"))["eos_token_id"]
    config = load_hf_config(teacher)
    ids, spans = packed_documents(eos, config.vocab_size)
    model = load_model(teacher).eval()
    bank = FilterBank("linear", config.hidden_size, 48, [2, 4], seed=1)
    student = TappedLM(model, [2, 4], bank, for_model(model, eos, torch.float32))
    plain = TappedLM(load_model(tiny[f"{kind}_teacher"]).eval(), [2, 4], bank)
    with torch.no_grad():
        logits, taps = student(ids)
        alone = lambda x: (lambda out: [out[0], *out[1]])(plain(x))
        assert span_difference([logits, *taps], alone, ids, spans) < ATOL
        logits_off, taps_off = plain(ids)
        assert span_difference([logits_off, *taps_off], alone, ids, spans) > 1e-3

    cfg = load_run_config(write_config(str(tmp_path / "c.yaml"), **base_config(tiny[f"{kind}_data"], teacher,
                                                                            str(tmp_path / "o"))))
    loader = lambda **placement: load_model(teacher, **placement)
    reference = place_frozen(cfg, loader, [2, 4], bank, True, DeepSpeedSettings.of({}))
    alone = lambda x: (lambda o: [o.logits, *o.taps])(reference(x))
    for eos_or_off, expect_equal in ((eos, True), (None, False)):
        out = place_frozen(cfg, loader, [2, 4], bank, True, DeepSpeedSettings.of({}), eos_or_off)(ids)
        diff = span_difference([out.logits, *out.taps], alone, ids, spans)
        assert (diff < ATOL) if expect_equal else (diff > 1e-3), (eos_or_off, diff)


def test_document_attention_refused_for_a_model_that_cannot_take_it(tiny, tmp_path, capsys):
    """An attention implementation that takes no document masks (here one registered with transformers,
    as a kernel package would): one line, before any process group.  A FlexAttention student, which
    has no backward on a CPU, is refused for training in one line too."""
    import torch.distributed as dist
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from ted_ds.cli import main as ted_main

    AttentionInterface.register("sdpa_without_document_masks", sdpa_attention_forward)
    teacher = with_attention(tiny["llama_teacher"], "sdpa_without_document_masks", tmp_path / "teacher")
    student = with_attention(tiny["llama_teacher"], "flex_attention", tmp_path / "student")
    for overrides, words in (([f"teacher.path={teacher}"], ("data.document_attention", "'sdpa_without_document_masks'",
                                                          "teacher")),
                            ([f"student.path={student}", "student.init_from_teacher=null"],
                             ("student", "'flex_attention'", "no backward on a CPU"))):
        cfg = base_config(tiny["llama_data"], tiny["llama_teacher"], str(tmp_path / "o"),
                          **{"distill.method": "kd", "data.document_attention": True})
        path = write_config(str(tmp_path / "bad.yaml"), **cfg)
        capsys.readouterr()
        assert ted_main(["distill", "--config", path, *overrides]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("ted-ds: error: ") and "\n" not in err and all(w in err for w in words), err
        assert not dist.is_initialized()
