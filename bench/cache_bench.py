"""The teacher cache: its size, the cost of building it, and what it saves over a sweep of students.

    python -m bench cache [--quick]        (python bench/cache_bench.py)

One 1-rank launch, on the benchmarks' tokenizer (8k vocabulary) and a slice of the Wikipedia sample:
a LLaMA teacher (8 layers, d=256: bench/common.py's, first trained briefly here so that its logits look
like a trained model's) and KD students of two of its blocks; seq 128, fp16 values.

* bytes per token of a real ``ted-ds cache-teacher`` build at k = 8, 64, 128, top-p 0.95 capped at 100
  and 64 samples per position (every file of the cache ÷ the tokens of its windows); the same windows
  re-encoded with their ids mapped one-to-one into 128,256 ids (17 bits, a LLaMA-3-sized vocabulary; the
  values unchanged); and a bound that does not
  rest on this small teacher's ids being predictable (zstd finds a weak model's top-k sets repetitive):
  the values as encoded plus 17 incompressible bits per id stored. Goal ≤ 200 B/token at k = 64;
* how far each cache's KD is from exact: on one batch of training windows and the KD student as it
  starts, the KD loss (T = 2, forward KL) from each cache — top-k and top-p in the tail form, top-64 also in
  the old renormalized form, the samples' estimate — against full-vocabulary KD from the teacher's fp32
  logits, and the cosine between their gradients in the student's logits;
* cache build throughput ÷ the teacher's forward alone over the same windows in the same batches
  (``place_frozen``'s teacher giving every logit, as an online KD run without top-k asks it). The build's
  time is the whole command: checks, hashing the teacher's weights, loading it, the forward, top-k,
  encoding, writing, checksums. Goal ≥ 0.9;
* the teacher's confidence (why top-p keeps what it keeps): its mass on its top 64 and the ids a token
  needs to reach p = 0.95, at T = 1 and 2;
* an α sweep of 5 KD students (each ``train.steps`` ≈ one epoch), with the teacher online vs from the
  k = 64 cache, the cache's build counted once on its side: total wall time online ÷ cached.

Writes bench/results/cache.json (full runs only).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import REPO, corpus_path, machine, save_result, tiny_world  # noqa: E402

KS = (8, 64, 128)
CUTS = {f"k{k}": {"teacher.logits_topk": k} for k in KS} | {  # the caches built, by name
    "p0.95k100": {"teacher.logits_topk": 100, "teacher.logits_top_p": 0.95},
    "s64": {"teacher.logits_topk": 0, "teacher.logits_sampling": "sampled", "teacher.logits_samples": 64}}
SEQ_LEN, MICRO, GLOBAL = 128, 4, 8
ALPHAS = (0.25, 0.5, 1.0, 2.0, 4.0)
WIDE_VOCAB = 128256


def trained_teacher(world: dict, workdir: str, steps: int) -> str:
    """bench/common.py's random teacher after ``steps`` of plain LM training on the data (once per world)."""
    import torch

    from ted_ds.data import PackedShardDataset, collate
    from ted_ds.losses import lm_loss
    from ted_ds.weights import load_model

    out = os.path.join(workdir, f"teacher-trained-{steps}")
    if os.path.isdir(out):
        return out
    model = load_model(world["teacher"])
    data = PackedShardDataset(world["data"], "train", SEQ_LEN)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x, y = collate(data, torch.randint(len(data), (8,), generator=gen).tolist())
        lm_loss(model(input_ids=x).logits, y).backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    from data_prep.tokenizer import load_tokenizer

    load_tokenizer(world["tokenizer"]).save_pretrained(out)
    return out


def small_data(world: dict, workdir: str, lines: int) -> str:
    """The first ``lines`` paragraphs of the corpus, tokenized as the world's data."""
    out = os.path.join(workdir, f"data-{lines}")
    if not os.path.isdir(out):
        text = os.path.join(workdir, f"corpus-{lines}.txt")
        with open(corpus_path(workdir)) as f, open(text, "w") as g:
            g.writelines(line for _, line in zip(range(lines), f))
        subprocess.run([sys.executable, "-m", "data_prep", "build", "--input", text, "--tokenizer", world["tokenizer"],
                        "--out", out, "--valid-fraction", "0.05", "--no-progress"], cwd=REPO, check=True,
                       capture_output=True)
    return out


def run_config(workdir: str, name: str, teacher: str, data: str, steps: int, **over) -> str:
    from ted_ds.config import apply_override

    cfg = {"teacher": {"path": teacher, "logits_topk": 64, "logits_dtype": "fp16"},
           "student": {"init_from_teacher": [0, 7]}, "data": {"path": data, "seq_len": SEQ_LEN, "eval_samples": 8},
           "distill": {"method": "kd"}, "optim": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 2},
           "train": {"out_dir": os.path.join(workdir, "runs", name), "micro_batch_size": MICRO,
                     "global_batch_size": GLOBAL, "steps": steps, "log_interval": steps, "eval_interval": 10**6,
                     "save_interval": 10**6, "deepspeed_config": os.path.join(REPO, "ds_configs", "zero3_cpu.json"),
                     "progress": False}}
    for key, value in over.items():
        apply_override(cfg, f"{key}={json.dumps(value)}")
    path = os.path.join(workdir, f"{name}.yaml")
    import yaml

    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def windows_of(data: str) -> list:
    """Every window the cache holds, train then valid (as the build lists them)."""
    from ted_ds.data import PackedShardDataset

    return [d[i] for split in ("train", "valid") for d in [PackedShardDataset(data, split, SEQ_LEN)]
            for i in range(len(d))]


def forward_alone(config: str, data: str) -> float:
    """Seconds of the teacher's forward (every logit) over the cache's windows, in its batches."""
    import functools

    import numpy as np
    import torch

    from ted_ds.config import load_run_config
    from ted_ds.engine import place_frozen
    from ted_ds.models import load_teacher
    from ted_ds.run import setup

    p, ds = setup(load_run_config(config, ["teacher.logits_topk=0"]))
    teacher = place_frozen(p.cfg, functools.partial(load_teacher, p.cfg), [], None, True, ds, None,
                          p.manifest["vocab_size"])
    windows = windows_of(data)
    start = time.perf_counter()
    for i in range(0, len(windows), MICRO):
        rows = windows[i:i + MICRO]
        teacher(torch.from_numpy(np.stack(rows + [rows[-1]] * (MICRO - len(rows))))[:, :-1])
    return time.perf_counter() - start


def worker(spec_path: str) -> None:
    """The launched rank: the forward alone, the three builds, then the sweep, online and cached in turn."""
    from ted_ds import distributed
    from ted_ds.cache.build import build_cache
    from ted_ds.cli import _quiet_libraries
    from ted_ds.config import load_run_config
    from ted_ds.run import run_recipe

    _quiet_libraries()
    spec = json.load(open(spec_path))
    seconds = {"forward": forward_alone(spec["runs"][0]["online"], spec["data"])}
    for name, (config, cache) in spec["caches"].items():
        start = time.perf_counter()
        build_cache(load_run_config(config), cache)
        seconds[f"build_{name}"] = time.perf_counter() - start
    json.dump(kd_against_full(spec["runs"][0]["online"], {n: c for n, (_, c) in spec["caches"].items()}),
              open(spec["exactness"], "w"))
    for i, run in enumerate(spec["runs"]):
        for variant in ("online", "cached")[::1 if i % 2 else -1]:  # alternate which goes first
            start = time.perf_counter()
            run_recipe(load_run_config(run[variant]))
            seconds[f"{variant}_{i}"] = time.perf_counter() - start
    with open(spec["out"], "w") as f:
        json.dump(seconds, f)
    distributed.shutdown()
    distributed.leave(0)


def kd_against_full(config: str, caches: dict[str, str]) -> dict[str, dict]:
    """KD of one batch of training windows (MICRO × SEQ_LEN tokens) for the KD student as it starts, from
    each cache and exact (the teacher's fp32 logits, every id): {name: {"kd", "error", "grad_cosine"}}."""
    import torch

    from ted_ds.cache.format import CacheRows, has_tail, source_key, verify
    from ted_ds.config import load_run_config
    from ted_ds.data import PackedShardDataset, collate
    from ted_ds.losses import kd_loss
    from ted_ds.models import load_student, load_teacher
    from ted_ds.plan import plan

    p = plan(load_run_config(config, ["teacher.logits_topk=0"]))
    samples, vocab, temperature = list(range(MICRO)), p.manifest["vocab_size"], p.cfg.distill.temperature
    x, y = collate(PackedShardDataset(p.cfg.data.path, "train", SEQ_LEN), samples)
    with torch.no_grad():
        teacher, student = load_teacher(p.cfg)(input_ids=x).logits[..., :vocab], load_student(p)(input_ids=x).logits

    def measured(loss_of) -> tuple[float, torch.Tensor]:
        leaf = student.detach().float().requires_grad_()
        loss = loss_of(leaf)
        loss.backward()
        return loss.item(), leaf.grad.flatten()

    full, full_grad = measured(lambda s: kd_loss(s, teacher, y, temperature))
    out = {"full": {"kd": full, "error": 0.0, "grad_cosine": 1.0}}
    key = source_key(p.cfg.data.path)[0]
    for name, cache in caches.items():
        manifest = verify(cache, checksums=False)
        rows = CacheRows(cache, manifest, [key], manifest["k"], tail=has_tail(manifest))
        for form, loss_of in cached_kd(name, *rows.read(samples), y, temperature).items():
            kd, grad = measured(loss_of)
            out[form] = {"kd": kd, "error": kd / full - 1,
                         "grad_cosine": torch.nn.functional.cosine_similarity(grad, full_grad, 0).item()}
    return out


def cached_kd(name: str, values, ids, counts, labels, temperature: float) -> dict:
    """{form: the student's logits -> KD loss} of one cache's rows: its own form, and for k64 the old
    renormalized form too."""
    from ted_ds.losses import kd_loss, sampled_kd_loss
    from ted_ds.teacher import support

    if counts is not None:
        return {name: lambda s: sampled_kd_loss(s, values, ids, counts, labels, temperature)}
    forms = {name: lambda s: kd_loss(s, values.float(), labels, temperature, ids, support=support(values, ids))}
    if name == "k64":
        forms["k64 renormalized"] = lambda s: kd_loss(s, values[..., :-1].float(), labels, temperature, ids,
                                                      topk_form="renormalized")
    return forms


def teacher_confidence(teacher: str, data: str, windows: int = 16, cap: int = 100) -> dict[str, dict]:
    """Why top-p keeps what it keeps: on the first ``windows`` validation windows (or all there are), the
    teacher's mass on its top 64 and the ids a token needs to reach p = 0.95, at T = 1 and T = 2."""
    import torch

    from ted_ds.data import PackedShardDataset, collate
    from ted_ds.weights import load_model

    model = load_model(teacher).eval()
    valid = PackedShardDataset(data, "valid", SEQ_LEN)
    x, _ = collate(valid, list(range(min(windows, len(valid)))))
    with torch.no_grad():
        logits = model(input_ids=x).logits.float().flatten(0, 1)
    out = {}
    for t in (1.0, 2.0):
        mass = torch.softmax(logits / t, -1).sort(-1, descending=True).values.cumsum(-1)
        need = (mass < 0.95).sum(-1) + 1
        out[f"T{t:g}"] = {"top64_mass": mass[:, 63].mean().item(), "median_ids_to_p95": need.median().item(),
                          "within_cap": (need <= cap).float().mean().item()}
    return out


def bytes_per_token(cache: str) -> dict[str, float]:
    """Bytes ÷ tokens of a cache: its files as written; every window re-encoded with its ids mapped
    one-to-one into WIDE_VOCAB ids (17 bits), values as they are; and a bound that owes nothing to this
    teacher's ids: the values as zstd packs them plus 17 incompressible bits per id stored; and the entries
    (ids) stored per token."""
    import numpy as np

    from ted_ds.cache.format import CacheRows, encode_variable, encode_window, id_bits, verify

    manifest = verify(cache, checksums=False)
    tokens = sum(s["windows"] for src in manifest["sources"].values() for s in src["splits"].values()) * SEQ_LEN
    spread = np.random.default_rng(0).permutation(WIDE_VOCAB)
    wide = values_only = entries = 0
    for key, src in manifest["sources"].items():
        for split, s in src["splits"].items():
            rows = CacheRows(cache, manifest, [key], manifest["k"], split)
            for j in range(s["windows"]):
                values, ids, kept, draws = rows.window(key, j)
                encode = (lambda v, i, b: encode_window(v, i, b)) if kept is None else (
                    lambda v, i, b, kept=kept, draws=draws: encode_variable(v, i, b, kept, draws))
                wide += len(encode(values, spread[ids], id_bits(WIDE_VOCAB))) + 8  # + its offset
                values_only += len(encode(values, np.zeros_like(ids), 1)) + 8
                entries += ids.size if kept is None else int(kept.sum())
    return {"written": sum(f["bytes"] for f in manifest["files"].values()) / tokens, "ids_17bit": wide / tokens,
            "bound_17bit": (values_only + entries * id_bits(WIDE_VOCAB) / 8) / tokens, "entries": entries / tokens}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke run: little data, 3 steps per student")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "ted-ds-bench"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", help=argparse.SUPPRESS)  # the launcher's
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    import shutil

    from ted_ds.data import PackedShardDataset
    from ted_ds.launch import local_deepspeed_command

    world = tiny_world(args.workdir)
    teacher = trained_teacher(world, args.workdir, 20 if args.quick else 600)
    data = small_data(world, args.workdir, 200 if args.quick else 1000)
    steps = 3 if args.quick else len(PackedShardDataset(data, "train", SEQ_LEN)) // GLOBAL  # one epoch
    work = os.path.join(args.workdir, "cache-bench")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    cache = lambda name: os.path.join(work, f"cache-{name}")
    spec = {"data": data, "out": os.path.join(work, "seconds.json"), "exactness": os.path.join(work, "kd.json"),
            "caches": {name: (run_config(work, f"for-cache-{name}", teacher, data, steps, **cut), cache(name))
                       for name, cut in CUTS.items()},
            "runs": [{v: run_config(work, f"{v}-{alpha}", teacher, data, steps, **{"distill.alpha": alpha},
                                    **({"teacher.cache": cache("k64")} if v == "cached" else {}))
                      for v in ("online", "cached")} for alpha in ALPHAS]}
    json.dump(spec, open(os.path.join(work, "spec.json"), "w"))
    cmd = local_deepspeed_command(1, os.path.abspath(__file__), "--worker", os.path.join(work, "spec.json"))
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"cache bench failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    s = json.load(open(spec["out"]))
    online = sum(s[f"online_{i}"] for i in range(len(ALPHAS)))
    cached = s["build_k64"] + sum(s[f"cached_{i}"] for i in range(len(ALPHAS)))
    result = {"machine": machine(), "seq_len": SEQ_LEN, "steps_per_run": steps, "seconds": s,
              "bytes_per_token": {name: bytes_per_token(cache(name)) for name in CUTS},
              "kd_against_full": json.load(open(spec["exactness"])),
              "teacher_confidence": teacher_confidence(teacher, data),
              "build_vs_forward": s["forward"] / s["build_k64"], "sweep_online_s": online, "sweep_cached_s": cached,
              "sweep_online_vs_cached": online / cached}
    report(result)
    if not args.quick:
        save_result("cache.json", result)
    return result


def report(r: dict) -> None:
    print(f"teacher cache, seq {r['seq_len']}, fp16 values")
    print(f"{'cache':>10}{'B/token written (13-bit ids)':>32}{'ids mapped to 17 bits':>24}{'bound, 17-bit ids':>20}"
          f"{'ids/token':>11}")
    for name, b in r["bytes_per_token"].items():
        print(f"{name:>10}{b['written']:>32.1f}{b['ids_17bit']:>24.1f}{b['bound_17bit']:>20.1f}{b['entries']:>11.1f}")
    for t, c in r["teacher_confidence"].items():
        print(f"teacher at {t}: top-64 mass {c['top64_mass']:.3f}, median ids to p 0.95 {c['median_ids_to_p95']}, "
              f"tokens within 100 {c['within_cap']:.3f}")
    print(f"KD (T = 2, forward KL) of one batch, {MICRO}×{r['seq_len']} tokens, the KD student as it starts:")
    print(f"{'from':>18}{'KD loss':>10}{'vs full':>10}{'grad cosine':>13}")
    for name, e in r["kd_against_full"].items():
        print(f"{name:>18}{e['kd']:>10.4f}{e['error']:>+10.1%}{e['grad_cosine']:>13.4f}")
    s = r["seconds"]
    print(f"build (k=64) {s['build_k64']:.1f} s vs teacher forward alone {s['forward']:.1f} s: throughput ratio "
          f"{r['build_vs_forward']:.2f} (goal >= 0.9)")
    print(f"5 KD students x {r['steps_per_run']} steps: online {r['sweep_online_s']:.0f} s, cached "
          f"{r['sweep_cached_s']:.0f} s (build included): online / cached = {r['sweep_online_vs_cached']:.2f}")


if __name__ == "__main__":
    main()
