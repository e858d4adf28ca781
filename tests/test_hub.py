"""Models named by hub id, found in a local Hugging Face cache laid out as huggingface_hub lays it
out (``models--org--name/{refs,snapshots}``), at the revision named; nothing is downloaded: the hub
endpoint is a local socket that records every connection, and none may come (offline mode is off, so
only ted-ds's own ``local_files_only`` keeps the client away)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from harness.common import REPO
from harness.tiny import base_config, write_config
from ted_ds.errors import ConfigError
from ted_ds.hub import resolve

MAIN, V1 = "a" * 40, "b" * 40


V1_SHIFT = 0.01  # v1's weights are main's plus this


@pytest.fixture(scope="module")
def hub_cache(tiny, tmp_path_factory) -> str:
    """acme/tiny-llama at main (the tiny teacher) and at tag v1 (another commit: every weight + V1_SHIFT)."""
    cache = str(tmp_path_factory.mktemp("hf-home") / "hub")
    repo = os.path.join(cache, "models--acme--tiny-llama")
    for ref, commit in (("main", MAIN), ("v1", V1)):
        shutil.copytree(tiny["llama_teacher"], os.path.join(repo, "snapshots", commit))
        os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
        with open(os.path.join(repo, "refs", ref), "w") as f:
            f.write(commit)
    weights = os.path.join(repo, "snapshots", V1, "model.safetensors")
    save_file({k: v + V1_SHIFT for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    return cache


@pytest.fixture(scope="module")
def hub_endpoint():
    """A local port standing in for the hub: (its URL, the connections it accepted). Each is closed at once."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:  # closed at the end of the module
                return
            accepted.append(conn.getpeername())
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}", accepted
    server.close()


@pytest.fixture
def online(hub_endpoint, monkeypatch):
    """huggingface_hub online (whatever the environment says) against hub_endpoint; fails the test if
    anything connected to it."""
    from huggingface_hub import constants

    url, accepted = hub_endpoint
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    before = len(accepted)
    yield {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")} | {
        "HF_ENDPOINT": url}
    assert accepted[before:] == [], "something tried to reach the hub"


def test_a_hub_id_resolves_to_its_cached_snapshot_at_a_revision(hub_cache, online, monkeypatch):
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
def test_a_missing_id_is_one_line_saying_where_it_looked(hub_cache, online, monkeypatch, name, revision, message):
    monkeypatch.setenv("HF_HUB_CACHE", hub_cache)
    with pytest.raises(ConfigError) as e:
        resolve(name, revision, "teacher.path")
    assert message.format(cache=hub_cache) in str(e.value) and "\n" not in str(e.value)


def test_training_and_eval_take_a_hub_id_at_its_revision_and_never_connect(tiny, hub_cache, online, tmp_path):
    """One process, one step at an LR of 1e-9: the teacher, and so the student made of its blocks, come from
    the v1 snapshot (the student's weights are v1's, V1_SHIFT away from main's); `ted-ds eval` scores main
    and `--revision v1` by id, each its own snapshot."""
    env = online | {"HF_HUB_CACHE": hub_cache}
    cfg = base_config(tiny["llama_data"], "acme/tiny-llama", str(tmp_path / "run"),
                      **{"distill.method": "kd", "train.steps": 1, "optim.lr": 1e-9, "optim.min_lr": 0.0})
    cfg["teacher"]["revision"] = "v1"
    r = subprocess.run([sys.executable, "-m", "ted_ds", "distill", "--config", write_config(str(tmp_path / "c.yaml"),
                                                                                            **cfg)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "distill-kd finished at step 1" in r.stderr, r.stderr[-3000:]
    snapshot = lambda commit: os.path.join(hub_cache, "models--acme--tiny-llama", "snapshots", commit)
    student = load_file(str(tmp_path / "run" / "hf" / "model.safetensors"))["model.embed_tokens.weight"]
    teacher = {c: load_file(os.path.join(snapshot(c), "model.safetensors"))["model.embed_tokens.weight"]
               for c in (MAIN, V1)}
    torch.testing.assert_close(student, teacher[V1], rtol=0, atol=1e-6)
    assert (student - teacher[MAIN]).abs().min() > V1_SHIFT / 2
    scores = {}
    for revision in ("main", "v1"):
        r = subprocess.run([sys.executable, "-m", "ted_ds", "eval", "acme/tiny-llama", "--revision", revision,
                            "--data", tiny["llama_data"], "--max-samples", "2", "--seq-len", "32", "--json"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        scores[revision] = json.loads(r.stdout)
    assert [scores[r]["model"] for r in ("main", "v1")] == [snapshot(MAIN), snapshot(V1)]
    assert scores["main"]["loss"] != scores["v1"]["loss"]
    r = subprocess.run([sys.executable, "-m", "ted_ds", "eval", "acme/absent", "--data", tiny["llama_data"]],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"ted-ds: error: model acme/absent is not in the local Hugging Face cache {hub_cache} (HF_HUB_CACHE / HF_HOME; "
        "nothing is downloaded: fetch it first, e.g. `hf download acme/absent`) [LocalEntryNotFoundError]"]
