"""ted-prep: round trip, worker invariance, resume, formats, compatibility and bad input."""

from __future__ import annotations

import glob
import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from data_prep.build import BuildOptions, _ShardSink, build
from data_prep.cli import main as prep_main
from data_prep.format import split_of
from data_prep.indexed import IndexedShard, ShardError, ShardWriter
from data_prep.tokenizer import load_tokenizer
from data_prep.verify import verify_dataset
from harness.common import corpus_lines


def run_build(inputs, tokenizer, out, **kw):
    kw.setdefault("progress", False)
    return build(BuildOptions(inputs=[str(i) for i in inputs], tokenizer=tokenizer, out=str(out), **kw))


def shard_documents(out, split) -> list[list[int]]:
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    docs = []
    for rec in manifest["shards"][split]:
        shard = IndexedShard(os.path.join(out, rec["name"]), manifest["index_codes"])
        docs += [shard.document(i).tolist() for i in range(len(shard))]
    return docs


def shard_bytes(out) -> dict[str, bytes]:
    return {os.path.basename(p): open(p, "rb").read() for p in sorted(glob.glob(os.path.join(out, "*-*.[bi][id][nx]")))}


@pytest.mark.parametrize("tok_fixture", ["sp_tokenizer", "gpt2_tokenizer"])
def test_round_trip_equals_tokenizer_output(request, tok_fixture, corpus_file, tmp_path):
    tok_dir = request.getfixturevalue(tok_fixture)
    manifest = run_build([corpus_file], tok_dir, tmp_path / "ds", valid_fraction=0.1, seed=7)
    tok = load_tokenizer(tok_dir)
    lines = [line for line in open(corpus_file, encoding="utf-8").read().split("\n") if line.strip()]
    for split in ("train", "valid"):
        expected = [tok(t, add_special_tokens=False).input_ids + [tok.eos_token_id]
                    for t in lines if split_of(t.encode(), 7, 0.1) == split]
        got = shard_documents(tmp_path / "ds", split)
        assert got == expected, split
        assert manifest["totals"][split]["documents"] == len(expected)
    assert 0 < manifest["totals"]["valid"]["documents"] < manifest["totals"]["train"]["documents"]
    if tok_fixture == "gpt2_tokenizer":  # byte-level BPE is lossless: decode gives the text back
        got = shard_documents(tmp_path / "ds", "train")
        train_lines = [t for t in lines if split_of(t.encode(), 7, 0.1) == "train"]
        assert [tok.decode(ids[:-1]) for ids in got] == train_lines
    assert manifest["dtype"] == "uint16"
    assert manifest["tokenizer"]["vocab_size"] == len(tok)
    verify_dataset(str(tmp_path / "ds"))


def test_worker_count_does_not_change_bytes(sp_tokenizer, corpus_file, tmp_path):
    outs = []
    for workers in (1, 2, 3):
        out = tmp_path / f"w{workers}"
        run_build([corpus_file], sp_tokenizer, out, workers=workers, shard_mb=0.05, valid_fraction=0.05)
        outs.append(shard_bytes(out))
    assert len(outs[0]) >= 8  # several shards per split
    assert outs[0] == outs[1] == outs[2]
    m = [json.load(open(tmp_path / f"w{w}" / "manifest.json")) for w in (1, 3)]
    assert m[0]["shards"] == m[1]["shards"]


def test_progress_counts_documents_while_the_inputs_are_still_being_read(sp_tokenizer, corpus_file, tmp_path,
                                                                       monkeypatch):
    """Fewer chunks than the pool's queue holds, read slowly (a network file system, a big decompression):
    the bar counts each chunk as its worker finishes it, not all of them after the last is read."""
    import data_prep.build as B

    events, read = [], B.iter_chunks
    per_chunk = sum(1 for _ in open(corpus_file, encoding="utf-8")) // 3 + 1  # three chunks

    def slow_read(*a, **kw):
        for chunk in read(*a, max_items=per_chunk, **kw):
            events.append("read")
            yield chunk
            time.sleep(1.0)

    monkeypatch.setattr(B, "iter_chunks", slow_read)
    monkeypatch.setattr(B._Progress, "update", lambda self, docs, tokens: events.append("progress"))
    run_build([corpus_file], sp_tokenizer, tmp_path / "out", workers=2)
    assert events.count("read") == 3 and events.index("progress") < len(events) - 1 - events[::-1].index("read")


def test_interrupted_build_resumes_without_redoing_shards(sp_tokenizer, corpus_file, tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    run_build([corpus_file], sp_tokenizer, ref, shard_mb=0.05, workers=2)

    out = tmp_path / "ds"
    finish = _ShardSink._finish
    calls = {"n": 0}

    def crash_after_three(self, split):
        if calls["n"] == 3:
            raise KeyboardInterrupt  # as if the job died while writing the 4th shard
        calls["n"] += 1
        finish(self, split)

    monkeypatch.setattr(_ShardSink, "_finish", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        run_build([corpus_file], sp_tokenizer, out, shard_mb=0.05, workers=2)
    state = json.load(open(out / ".build-state.json"))
    finished = [r["name"] for s in ("train", "valid") for r in state["done"][s]]
    assert len(finished) == 3
    assert not glob.glob(str(out / "*.tmp"))  # the aborted shard left nothing behind
    on_disk = {os.path.basename(p)[:-4] for p in glob.glob(str(out / "*.bin"))}
    assert on_disk == set(finished)  # no partial shard under a final name
    inodes = {n: os.stat(out / f"{n}.bin").st_mtime_ns for n in finished}

    monkeypatch.setattr(_ShardSink, "_finish", finish)
    run_build([corpus_file], sp_tokenizer, out, shard_mb=0.05, workers=1)
    assert {n: os.stat(out / f"{n}.bin").st_mtime_ns for n in finished} == inodes  # not redone
    assert shard_bytes(out) == shard_bytes(ref)
    assert not os.path.exists(out / ".build-state.json")
    verify_dataset(str(out))


def test_sigkilled_build_subprocess_resumes(sp_tokenizer, tmp_path):
    corpus = tmp_path / "big.txt"
    corpus.write_text("\n".join(corpus_lines(9255)) + "\n", encoding="utf-8")
    out = tmp_path / "ds"
    cmd = [sys.executable, "-m", "data_prep", "build", "--input", str(corpus), "--tokenizer", sp_tokenizer,
           "--out", str(out), "--shard-mb", "0.02", "--no-progress"]
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    state = out / ".build-state.json"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and len(json.load(open(state))["done"]["train"]) >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if not state.exists():
        pytest.skip("build finished before it could be killed")
    done = json.load(open(state))["done"]["train"]
    assert 5 <= len(done) < 140
    kept = {r["name"]: os.stat(out / f"{r['name']}.bin").st_mtime_ns for r in done}
    assert subprocess.run(cmd, stderr=subprocess.PIPE).returncode == 0
    assert {n: os.stat(out / f"{n}.bin").st_mtime_ns for n in kept} == kept
    ref = tmp_path / "ref"
    run_build([corpus], sp_tokenizer, ref, shard_mb=0.02)
    assert shard_bytes(out) == shard_bytes(ref)


def test_input_formats_give_the_same_tokens(sp_tokenizer, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    docs = corpus_lines(60)
    (tmp_path / "a.txt").write_text("\n".join(docs[:20]) + "\n")
    with gzip.open(tmp_path / "b.txt.gz", "wt") as f:
        f.write("\n\n".join(d.replace(". ", ".\n", 1) for d in docs[20:30]) + "\n")  # blank-line separated
    with open(tmp_path / "c.jsonl.zst", "wb") as f:
        f.write(zstandard.ZstdCompressor().compress(
            "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs[30:40])).encode()))
    pq.write_table(pa.table({"text": docs[40:50]}), tmp_path / "d.parquet")
    datasets.Dataset.from_dict({"text": docs[50:60]}).save_to_disk(str(tmp_path / "hf"))

    run_build([tmp_path / "a.txt"], sp_tokenizer, tmp_path / "o1", valid_fraction=0.0)
    run_build([tmp_path / "b.txt.gz"], sp_tokenizer, tmp_path / "o2", valid_fraction=0.0, blank_line_docs=True)
    run_build([tmp_path / "c.jsonl.zst"], sp_tokenizer, tmp_path / "o3", valid_fraction=0.0)
    run_build([tmp_path / "d.parquet", tmp_path / "hf"], sp_tokenizer, tmp_path / "o4", valid_fraction=0.0)
    tok = load_tokenizer(sp_tokenizer)
    enc = lambda t: tok(t, add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert shard_documents(tmp_path / "o1", "train") == [enc(d) for d in docs[:20]]
    assert shard_documents(tmp_path / "o2", "train") == [enc(d.replace(". ", ".\n", 1)) for d in docs[20:30]]
    assert shard_documents(tmp_path / "o3", "train") == [enc(d) for d in docs[30:40]]
    assert shard_documents(tmp_path / "o4", "train") == [enc(d) for d in docs[40:60]]
    # a directory and a glob expand in sorted order
    m = run_build([str(tmp_path / "*.txt*"), tmp_path / "c.jsonl.zst"], sp_tokenizer, tmp_path / "o5",
                  valid_fraction=0.0)
    assert [s["path"].rsplit("/", 1)[1] for s in m["sources"]] == ["a.txt", "b.txt.gz", "c.jsonl.zst"]


def test_deepspeed_mmap_indexed_dataset_reads_shards(sp_tokenizer, corpus_file, tmp_path):
    from deepspeed.runtime.data_pipeline.data_sampling.indexed_dataset import MMapIndexedDataset

    run_build([corpus_file], sp_tokenizer, tmp_path / "ds", index_codes="deepspeed", shard_mb=0.1)
    ours = shard_documents(tmp_path / "ds", "train")
    ds = MMapIndexedDataset(str(tmp_path / "ds" / "train-00000"), skip_warmup=True)
    assert ds.dtype == np.uint16
    assert [ds[i].tolist() for i in range(len(ds))] == ours[: len(ds)]
    # large vocabularies: uint32 in the deepspeed table, int32 (code 4, common to both tables) in megatron's
    tokens = np.array([0, 70000, 2**31 - 1, 5], dtype=np.int64)
    for codes, dtype in (("deepspeed", np.uint32), ("megatron", np.int32)):
        w = ShardWriter(str(tmp_path / f"big-{codes}"), np.dtype(dtype), codes)
        w.add_documents(tokens, np.array([3, 1]))
        w.finish()
        ds = MMapIndexedDataset(str(tmp_path / f"big-{codes}"), skip_warmup=True)
        assert ds.dtype == dtype
        assert ds[0].tolist() == [0, 70000, 2**31 - 1] and ds[1].tolist() == [5]
        assert IndexedShard(str(tmp_path / f"big-{codes}"), codes).document(0).tolist() == [0, 70000, 2**31 - 1]


def test_verify_and_loader_reject_damaged_shards(sp_tokenizer, corpus_file, tmp_path, capsys):
    out = tmp_path / "ds"
    run_build([corpus_file], sp_tokenizer, out, shard_mb=0.03)
    assert prep_main(["verify", str(out)]) == 0
    data = bytearray(open(out / "train-00001.bin", "rb").read())
    data[100] ^= 0xFF
    open(out / "train-00001.bin", "wb").write(data)
    capsys.readouterr()
    assert prep_main(["verify", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "train-00001.bin" in err and "sha256" in err
    with open(out / "train-00002.bin", "r+b") as f:
        f.truncate(os.path.getsize(out / "train-00002.bin") - 2)
    with pytest.raises(ShardError, match="train-00002.bin.*truncated"):
        IndexedShard(str(out / "train-00002"))
    with open(out / "train-00000.idx", "r+b") as f:
        f.truncate(40)
    with pytest.raises(ShardError, match="train-00000.idx"):
        IndexedShard(str(out / "train-00000"))
    from ted_ds.data import PackedShardDataset

    with pytest.raises(ShardError):
        PackedShardDataset(str(out), "train", 64)


def test_inspect_decodes_a_sample(sp_tokenizer, corpus_file, tmp_path, capsys):
    run_build([corpus_file], sp_tokenizer, tmp_path / "ds")
    assert prep_main(["inspect", str(tmp_path / "ds")]) == 0
    out = capsys.readouterr().out
    assert "train: 1 shards" in out and corpus_lines(1)[0][:60] in out


def test_tokenizer_command_trains_loadable_tokenizers(tmp_path, corpus_file):
    import sentencepiece as spm

    for model_type in ("bpe", "unigram"):
        out = tmp_path / model_type
        assert prep_main(["tokenizer", "--input", corpus_file, "--vocab-size", "800", "--model-type", model_type,
                          "--out", str(out)]) == 0
        tok = load_tokenizer(str(out))
        assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
        assert len(tok) == 800
        sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
        lines = corpus_lines(50, start=3000) + ["Digits 12345 and ünïcødé 你好."]
        assert all(sp.encode(t) == tok(t, add_special_tokens=False).input_ids for t in lines), model_type
        assert tok("Hello").input_ids[0] == 1  # BOS on by default, LLaMA style
    assert prep_main(["tokenizer", "--input", corpus_file, "--vocab-size", "800", "--out", str(tmp_path / "bpe")]) == 2


# ------------------------------------------------------------------ bad input: one clear line, nothing written
def _fails(capsys, argv, *fragments):
    capsys.readouterr()
    assert prep_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ted-prep: error: ") and "\n" not in err, err
    for frag in fragments:
        assert frag in err, (frag, err)
    return err


def test_bad_inputs_fail_with_one_clear_line(sp_tokenizer, corpus_file, tmp_path, capsys):
    out = tmp_path / "out"
    b = ["build", "--tokenizer", sp_tokenizer, "--out", str(out), "--no-progress", "--input"]
    _fails(capsys, b + [str(tmp_path / "nope.txt")], "input not found", "nope.txt")
    _fails(capsys, b + [str(tmp_path / "*.nothing")], "matches no files")
    (tmp_path / "x.csv").write_text("a,b\n")
    _fails(capsys, b + [str(tmp_path / "x.csv")], "unsupported input type", "x.csv")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": broken\n')
    _fails(capsys, b + [str(tmp_path / "bad.jsonl")], "bad.jsonl:2", "not valid JSON")
    (tmp_path / "nofield.jsonl").write_text('{"body": "x"}\n')
    _fails(capsys, b + [str(tmp_path / "nofield.jsonl")], "nofield.jsonl:1", "'text'")
    good = gzip.compress(b"line one\nline two\n" * 2000)
    (tmp_path / "cut.txt.gz").write_bytes(good[: len(good) // 2])
    _fails(capsys, b + [str(tmp_path / "cut.txt.gz")], "cut.txt.gz", "truncated")
    (tmp_path / "empty.txt").write_text("\n  \n\n")
    _fails(capsys, b + [str(tmp_path / "empty.txt")], "no non-empty documents", "3 empty skipped")
    _fails(capsys, ["build", "--tokenizer", str(tmp_path), "--out", str(out), "--input", corpus_file],
           "does not load")
    _fails(capsys, ["build", "--tokenizer", _hollow_tokenizer(tmp_path / "hollow"), "--out", str(out), "--input",
                    corpus_file], "turns plain English text into no tokens", "vocabulary of 3")
    _fails(capsys, b + [corpus_file, "--valid-fraction", "1.5"], "--valid-fraction")
    twice = tmp_path / "twice"  # one corpus as .jsonl and as .parquet: every document would be read twice
    twice.mkdir()
    import pyarrow as pa
    import pyarrow.parquet as pq

    (twice / "docs.jsonl").write_text('{"text": "one"}\n')
    pq.write_table(pa.table({"text": ["one"]}), twice / "docs.parquet")
    _fails(capsys, b + [str(twice)], f"{twice} mixes file formats (1 .jsonl, 1 .parquet)", f"'{twice}/*.jsonl'")
    assert not out.exists() or not any(p.suffix == ".bin" for p in out.iterdir())


def _hollow_tokenizer(out) -> str:
    """A loadable tokenizer.json with nothing but special tokens, as a failed conversion leaves it."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab={"<unk>": 0, "<s>": 1, "</s>": 2}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    out.mkdir()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text('{"eos_token": "</s>", "bos_token": "<s>", "unk_token": "<unk>"}')
    return str(out)


def test_utf8_policy_replace_and_count_or_strict(sp_tokenizer, tmp_path, capsys):
    (tmp_path / "mixed.txt").write_bytes(b"good line\n\n   \nbad \xff\xfe byte\nanother good\n")
    m = run_build([tmp_path / "mixed.txt"], sp_tokenizer, tmp_path / "ok", valid_fraction=0.0)
    assert m["stats"] == {"documents": 3, "empty_skipped": 2, "utf8_replaced": 1}
    tok = load_tokenizer(sp_tokenizer)
    assert "\ufffd" in tok.decode(shard_documents(tmp_path / "ok", "train")[1])
    _fails(capsys, ["build", "--strict", "--no-progress", "--tokenizer", sp_tokenizer, "--out",
                    str(tmp_path / "strict"), "--input", str(tmp_path / "mixed.txt")], "mixed.txt:4", "invalid UTF-8")


def test_output_dir_holding_another_dataset_is_refused(sp_tokenizer, gpt2_tokenizer, corpus_file, tmp_path, capsys):
    out = tmp_path / "ds"
    run_build([corpus_file], sp_tokenizer, out)
    before = shard_bytes(out)
    _fails(capsys, ["build", "--no-progress", "--tokenizer", gpt2_tokenizer, "--out", str(out), "--input", corpus_file],
           "holds a different dataset", "tokenizer")
    _fails(capsys, ["build", "--no-progress", "--tokenizer", sp_tokenizer, "--out", str(out), "--input", corpus_file,
                    "--seed", "9"],
           "seed")
    assert shard_bytes(out) == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "precious.txt").write_text("x")
    _fails(capsys, ["build", "--tokenizer", sp_tokenizer, "--out", str(tmp_path / "other"), "--input", corpus_file],
           "not empty")
    # the same command again is a no-op
    assert prep_main(["build", "--tokenizer", sp_tokenizer, "--out", str(out), "--input", corpus_file,
                      "--no-progress"]) == 0
    assert shard_bytes(out) == before


def test_cli_errors_have_no_traceback():
    r = subprocess.run([sys.executable, "-m", "data_prep", "build", "--input", "/nonexistent.txt", "--tokenizer",
                        "/x", "--out", "/tmp/never"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and r.stderr.strip() == "ted-prep: error: input not found: /nonexistent.txt"
    r = subprocess.run([sys.executable, "-m", "data_prep", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "tokenizer" in r.stdout and "inspect" in r.stdout


@pytest.mark.parametrize("tok_fixture", ["sp_tokenizer", "gpt2_tokenizer"])
def test_light_tokenizer_loader_agrees_with_transformers(request, tok_fixture):
    from data_prep.tokenizer import TokenizerDir, load_tokenizer_for_build, vocab_fingerprint

    path = request.getfixturevalue(tok_fixture)
    light, full = load_tokenizer_for_build(path), load_tokenizer(path)
    assert isinstance(light, TokenizerDir)
    assert (light.eos_token_id, light.bos_token_id, light.unk_token_id, len(light)) == \
        (full.eos_token_id, full.bos_token_id, full.unk_token_id, len(full))
    assert vocab_fingerprint(light) == vocab_fingerprint(full)


def _cut_reference(shard, used, sizes, limit):
    out = []
    for size in sizes:
        if used and used + size > limit:
            shard, used = shard + 1, 0
        out.append(shard)
        used += size
    return out, shard, used


def test_cut_shards_matches_the_one_document_at_a_time_rule():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from data_prep.build import cut_shards

    @settings(max_examples=300, deadline=None)
    @given(sizes=st.lists(st.integers(1, 50), max_size=60), limit=st.integers(1, 120), used=st.integers(0, 80))
    def check(sizes, limit, used):
        runs, shard, after = cut_shards(3, used, np.array(sizes, dtype=np.int64), limit)
        assigned = [s for s, a, b in runs for _ in range(a, b)]
        assert (assigned, shard, after) == _cut_reference(3, used, sizes, limit)
        assert [a for _, a, _ in runs] == sorted({a for _, a, _ in runs})

    check()
