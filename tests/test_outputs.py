"""What leaves training without a process group: HF directories written whole or not at all, and
``ted-ds eval`` reading its split once."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from harness.tiny import damage_token
from ted_ds import evaluate, export
from ted_ds.architectures import load_hf_config


def test_an_hf_directory_is_replaced_whole_or_kept(tiny, tmp_path, monkeypatch):
    """A write that fails half-way (here: copying the tokenizer) keeps the previous directory as it was and
    leaves no temporary one behind."""
    teacher = tiny["llama_teacher"]
    config, state = load_hf_config(teacher), load_file(os.path.join(teacher, "model.safetensors"))
    out = str(tmp_path / "hf")
    export.write_hf_dir(config, state, out, teacher)
    before = sorted(os.listdir(out))
    assert "model.safetensors" in before and "tokenizer.json" in before

    def full_disk(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copy2", full_disk)
    with pytest.raises(OSError, match="No space left"):
        export.write_hf_dir(config, {k: v + 1 for k, v in state.items()}, out, teacher)
    assert sorted(os.listdir(out)) == before and os.listdir(tmp_path) == ["hf"]
    assert all(torch.equal(v, state[k]) for k, v in load_file(os.path.join(out, "model.safetensors")).items())


def test_evaluation_opens_its_split_once(tiny, monkeypatch):
    opened = []
    dataset = evaluate.PackedShardDataset
    monkeypatch.setattr(evaluate, "PackedShardDataset", lambda *a: opened.append(a) or dataset(*a))
    r = evaluate.evaluate_hf(tiny["llama_teacher"], tiny["llama_data"], "valid", 32, 2, 2, "cpu", progress=False)
    assert r["samples"] == 2 and opened == [(tiny["llama_data"], "valid", 32)]


def test_eval_takes_the_window_a_ted_ds_model_was_trained_at(tiny, tmp_path):
    """A model ted-ds wrote records its training seq_len; eval scores windows of it, not of the model's
    positions (which the window a model was trained at may be far below)."""
    teacher = tiny["llama_teacher"]
    config, state = load_hf_config(teacher), load_file(os.path.join(teacher, "model.safetensors"))
    out = str(tmp_path / "hf")
    export.write_hf_dir(config, state, out, teacher, seq_len=24)
    r = evaluate.evaluate_hf(out, tiny["llama_data"], "valid", None, 2, 2, "cpu", progress=False)
    assert r["seq_len"] == 24 and export.trained_seq_len(teacher) is None


def test_export_compares_logits_on_the_first_sources_validation_windows(tiny):
    """The run's data section as saved in trainer_state.json; random ids once the data is gone."""
    from ted_ds.config import data_config
    from ted_ds.data import PackedShardDataset, collate

    sources = [{"name": "a", "path": tiny["llama_data"]}, {"name": "b", "path": "/gone"}]
    batch = export.sample_batch(data_config({"sources": sources, "seq_len": 16}), 1000)
    assert torch.equal(batch, collate(PackedShardDataset(tiny["llama_data"], "valid", 16), [0, 1, 2, 3])[0])
    assert export.sample_batch(data_config({"path": "/gone", "seq_len": 16}), 1000).shape == (4, 16)


def _eval_error(capsys, model: str, data: str) -> str:
    from ted_ds.cli import main as ted_main

    capsys.readouterr()
    assert ted_main(["eval", model, "--data", data, "--seq-len", "32", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().split("ted-ds: error: ")  # after the progress bar's first draw
    assert len(err) == 2 and "\n" not in err[1], err
    return err[1]


def test_eval_refuses_shards_of_another_tokenizer(tiny, capsys):
    """The GPT-2 teacher's vocabulary (1200) is larger than the LLaMA shards' (1000): the sizes fit, the
    ids mean other tokens, and a perplexity would be nonsense."""
    err = _eval_error(capsys, tiny["gpt2_teacher"], tiny["llama_data"])
    assert f"model {tiny['gpt2_teacher']} has a different tokenizer than the data" in err, err


def test_a_damaged_window_is_one_line_naming_the_shard_and_the_window(tiny, tmp_path, capsys):
    data = str(tmp_path / "data")
    shutil.copytree(tiny["llama_data"], data)
    shard = damage_token(data, "valid", 3)
    err = _eval_error(capsys, tiny["llama_teacher"], data)
    assert f"{shard}: token " in err and "(in window 3 of the valid split) is id 65535, past the vocabulary of 1000" \
        in err and f"ted-prep verify {data}" in err, err
