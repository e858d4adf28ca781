"""Top-k KD against full-vocabulary KD: what each way of reading the teacher's top-k costs the student.

    python -m bench kd-topk [--quick]        (python bench/kd_topk_bench.py)

One process, plain PyTorch on the CPU, the objective exactly as a run computes it (``distill_objective``:
CE + α·T²·KD, α = 1, the teacher's logits through ``teacher_logits``). The teacher is the cache bench's
(bench/common.py's LLaMA, 8 layers, d = 256, 8k vocabulary, trained ``--teacher-steps`` on the Wikipedia
sample so its distribution looks like a trained model's); each student starts as its blocks 0 and 7 (as
``student.init_from_teacher: [0, 7]``). At T = 2 and T = 1, for each seed (the order of the training
windows), four students train side by side on the same batches for the same steps — KD on every logit,
top-64 and top-8 in the tail form (the default), top-64 renormalised (the old form) — and are scored by
their next-token loss on the same validation windows.

Also, per form, how far it is from full KD on the same batch (the students as they start, validation
windows): its KD loss ÷ the full KD loss, and the cosine between its gradient in the student's logits and
full KD's; and the teacher's softened mass on its top-k.

Full runs write bench/results/kd_topk.json.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.common import machine, save_result, tiny_world  # noqa: E402

FORMS = {"full": (0, "tail"), "tail-64": (64, "tail"), "tail-8": (8, "tail"), "renormalized-64": (64, "renormalized")}
TEMPERATURES = (2.0, 1.0)
SEEDS = (0, 1, 2)
SEQ_LEN, BATCH, VALID_WINDOWS = 128, 4, 32
LR, MIN_LR, WARMUP = 1e-3, 1e-4, 10


def teacher_side(logits: torch.Tensor, form: str, temperature: float) -> tuple:
    """What KD reads of the teacher's logits in ``form``, as every placement and the cache give it."""
    from ted_ds.teacher import teacher_logits

    k, topk_form = FORMS[form]
    return teacher_logits(logits, None, k, torch.float32, temperature if k and topk_form == "tail" else None)


def weights(form: str, temperature: float):
    from ted_ds.losses import ObjectiveWeights

    return ObjectiveWeights(1.0, 0.0, temperature, "mse", topk_form=FORMS[form][1])


def windows(data, indices) -> tuple[torch.Tensor, torch.Tensor]:
    from ted_ds.data import collate

    return collate(data, list(indices))


def train_side_by_side(teacher, teacher_dir: str, train, temperature: float, seed: int, steps: int) -> dict:
    """One student per form, trained on the same ``steps`` batches (drawn by ``seed``); the students."""
    from ted_ds.config import OptimConfig
    from ted_ds.losses import distill_objective
    from ted_ds.optim import lr_multiplier
    from ted_ds.weights import load_teacher_blocks

    schedule = OptimConfig(lr=LR, min_lr=MIN_LR, warmup_steps=WARMUP)
    students = {form: load_teacher_blocks(teacher_dir, [0, 7]) for form in FORMS}
    opts = {form: torch.optim.AdamW(s.parameters(), lr=LR) for form, s in students.items()}
    draws = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x, y = windows(train, torch.randint(len(train), (BATCH,), generator=draws).tolist())
        with torch.no_grad():
            z = teacher(input_ids=x).logits
        for form, student in students.items():
            for group in opts[form].param_groups:
                group["lr"] = LR * lr_multiplier(step, schedule, steps)
            values, index = teacher_side(z, form, temperature)
            terms = distill_objective(student(input_ids=x).logits, None, y, values, None, weights(form, temperature),
                                      index)
            terms["loss"].backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opts[form].step()
            opts[form].zero_grad()
    return students


@torch.no_grad()
def validation_loss(model, valid) -> float:
    from ted_ds.losses import lm_loss

    losses = [lm_loss(model(input_ids=x).logits, y).item()
              for x, y in (windows(valid, range(i, min(i + BATCH, VALID_WINDOWS))) for i in range(0, VALID_WINDOWS,
                                                                                                    BATCH))]
    return statistics.fmean(losses)


def approximation(teacher, student, valid, temperature: float) -> dict:
    """Per form, on the validation windows: KD loss ÷ full KD's, the cosine of its student-logit gradient with
    full KD's, and the teacher's softened mass on the top-k."""
    from ted_ds.losses import kd_loss

    x, y = windows(valid, range(min(VALID_WINDOWS, 16)))
    with torch.no_grad():
        z, s = teacher(input_ids=x).logits, student(input_ids=x).logits
    out, full = {}, None
    for form in FORMS:
        values, index = teacher_side(z, form, temperature)
        leaf = s.detach().requires_grad_()
        loss = kd_loss(leaf, values, y, temperature, index, topk_form=FORMS[form][1])
        loss.backward()
        grad = leaf.grad.flatten().double()
        full = full or (loss.item(), grad)
        mass = 1.0 if index is None else torch.softmax(z / temperature, -1).gather(-1, index).sum(-1).mean().item()
        out[form] = {"kd": loss.item(), "kd_vs_full": loss.item() / full[0], "teacher_mass_on_topk": mass,
                     "grad_cosine_with_full": torch.nn.functional.cosine_similarity(grad, full[1], dim=0).item()}
    return out


def measure(teacher_dir: str, data: str, steps: int) -> dict:
    from ted_ds.data import PackedShardDataset
    from ted_ds.weights import load_model, load_teacher_blocks

    torch.manual_seed(0)
    teacher = load_model(teacher_dir).eval()
    train, valid = PackedShardDataset(data, "train", SEQ_LEN), PackedShardDataset(data, "valid", SEQ_LEN)
    result = {"teacher_valid_loss": validation_loss(teacher, valid), "runs": {}, "approximation": {}}
    start_student = load_teacher_blocks(teacher_dir, [0, 7])
    result["start_valid_loss"] = validation_loss(start_student, valid)
    for temperature in TEMPERATURES:
        result["approximation"][f"T={temperature:g}"] = approximation(teacher, start_student, valid, temperature)
        for seed in SEEDS:
            began = time.perf_counter()
            students = train_side_by_side(teacher, teacher_dir, train, temperature, seed, steps)
            result["runs"][f"T={temperature:g},seed={seed}"] = {
                **{form: validation_loss(s, valid) for form, s in students.items()},
                "seconds": time.perf_counter() - began}
    return result


def summary(runs: dict) -> dict:
    """Per temperature and form: mean validation loss and perplexity over the seeds, and perplexity ÷ full's."""
    out = {}
    for temperature in TEMPERATURES:
        rows = [r for name, r in runs.items() if name.startswith(f"T={temperature:g},")]
        mean = {form: statistics.fmean(r[form] for r in rows) for form in FORMS}
        out[f"T={temperature:g}"] = {form: {"valid_loss": mean[form], "ppl": math.exp(mean[form]),
                                            "ppl_vs_full": math.exp(mean[form] - mean["full"]),
                                            "loss_by_seed": [r[form] for r in rows]} for form in FORMS}
    return out


def main(argv=None) -> dict:
    from bench.cache_bench import trained_teacher

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke run: 3 steps, a barely trained teacher")
    ap.add_argument("--steps", type=int, default=60, help="training steps of every student")
    ap.add_argument("--teacher-steps", type=int, default=150, help="the teacher's LM training (cache bench: 600)")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "ted-ds-bench"))
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    world = tiny_world(args.workdir)
    teacher = trained_teacher(world, args.workdir, 20 if args.quick else args.teacher_steps)
    steps = 3 if args.quick else args.steps
    result = {"machine": machine(), "seq_len": SEQ_LEN, "batch": BATCH, "steps": steps, "lr": LR,
              "teacher_lm_steps": 20 if args.quick else args.teacher_steps,
              "valid_windows": VALID_WINDOWS, **measure(teacher, world["data"], steps)}
    result["summary"] = summary(result["runs"])
    report(result)
    if not args.quick:
        save_result("kd_topk.json", result)
    return result


def report(r: dict) -> None:
    print(f"KD students, {r['steps']} steps of {r['batch']}×{r['seq_len']} tokens, {len(SEEDS)} seeds; teacher "
          f"valid loss {r['teacher_valid_loss']:.3f}, student at start {r['start_valid_loss']:.3f}")
    print(f"{'T':>4} {'form':<17}{'valid loss':>11}{'ppl':>9}{'ppl/full':>9}{'KD/full KD':>11}{'grad cos':>9}"
          f"{'top-k mass':>11}")
    for t, forms in r["summary"].items():
        for form, s in forms.items():
            a = r["approximation"][t][form]
            print(f"{t[2:]:>4} {form:<17}{s['valid_loss']:>11.3f}{s['ppl']:>9.1f}{s['ppl_vs_full']:>9.3f}"
                  f"{a['kd_vs_full']:>11.3f}{a['grad_cosine_with_full']:>9.3f}{a['teacher_mass_on_topk']:>11.3f}")


if __name__ == "__main__":
    main()
