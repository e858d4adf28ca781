"""Models named by hub id, found in a local Hugging Face cache laid out as huggingface_hub lays it
out (``models--org--name/{refs,snapshots}``); nothing is downloaded (no network here)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from harness.common import REPO
from harness.tiny import base_config, write_config
from ted_ds.errors import ConfigError
from ted_ds.hub import resolve

MAIN, V1 = "a" * 40, "b" * 40


@pytest.fixture(scope="module")
def hub_cache(tiny, tmp_path_factory) -> str:
    """acme/tiny-llama at main (the tiny teacher) and at tag v1 (the same files, another commit)."""
    cache = str(tmp_path_factory.mktemp("hf-home") / "hub")
    repo = os.path.join(cache, "models--acme--tiny-llama")
    for ref, commit in (("main", MAIN), ("v1", V1)):
        shutil.copytree(tiny["llama_teacher"], os.path.join(repo, "snapshots", commit))
        os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
        with open(os.path.join(repo, "refs", ref), "w") as f:
            f.write(commit)
    return cache


def test_a_hub_id_resolves_to_its_cached_snapshot_at_a_revision(hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", hub_cache)
    snapshots = os.path.join(hub_cache, "models--acme--tiny-llama", "snapshots")
    assert resolve("acme/tiny-llama") == os.path.join(snapshots, MAIN)
    assert resolve("acme/tiny-llama", "v1") == os.path.join(snapshots, V1)
    assert resolve("acme/tiny-llama", V1) == os.path.join(snapshots, V1)
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", os.path.dirname(hub_cache))  # HF_HOME/hub, as huggingface_hub reads it
    assert resolve("acme/tiny-llama") == os.path.join(snapshots, MAIN)


@pytest.mark.parametrize("name, revision, message", [
    ("acme/absent", None, "teacher.path acme/absent is not in the local Hugging Face cache {cache}"),
    ("acme/tiny-llama", "v2", "teacher.path acme/tiny-llama at revision v2 is not in the local Hugging Face cache"),
    ("not a model", None, "teacher.path not found: not a model (neither a local path nor an org/name hub id)"),
])
def test_a_missing_id_is_one_line_saying_where_it_looked(hub_cache, monkeypatch, name, revision, message):
    monkeypatch.setenv("HF_HUB_CACHE", hub_cache)
    with pytest.raises(ConfigError) as e:
        resolve(name, revision, "teacher.path")
    assert message.format(cache=hub_cache) in str(e.value) and "\n" not in str(e.value)


def test_training_and_eval_take_a_hub_id_offline(tiny, hub_cache, tmp_path):
    """One process, one step: the teacher (and the student's blocks) come from the cached snapshot;
    `ted-ds eval` scores the cached model by id."""
    env = dict(os.environ, HF_HUB_CACHE=hub_cache, HF_HUB_OFFLINE="1")
    cfg = base_config(tiny["llama_data"], "acme/tiny-llama", str(tmp_path / "run"),
                      **{"distill.method": "kd", "train.steps": 1})
    cfg["teacher"]["revision"] = "v1"
    r = subprocess.run([sys.executable, "-m", "ted_ds", "distill", "--config", write_config(str(tmp_path / "c.yaml"),
                                                                                            **cfg)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "distill-kd finished at step 1" in r.stderr, r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-m", "ted_ds", "eval", "acme/tiny-llama", "--data", tiny["llama_data"],
                        "--max-samples", "2", "--seq-len", "32", "--json"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0 and '"ppl"' in r.stdout, r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-m", "ted_ds", "eval", "acme/absent", "--data", tiny["llama_data"]],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"ted-ds: error: model acme/absent is not in the local Hugging Face cache {hub_cache} (HF_HUB_CACHE / HF_HOME; "
        "nothing is downloaded: fetch it first, e.g. `hf download acme/absent`) [LocalEntryNotFoundError]"]
