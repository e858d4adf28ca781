"""Pipeline teacher vs a single-process teacher, run under a launcher with any number of ranks.

    deepspeed --num_gpus 4 tests/harness/mp/pipeline_check.py --teacher DIR --bank DIR --out results.json
    python tests/harness/mp/pipeline_check.py ... --fault die|shape        (ranks started by the test itself)

Each rank feeds its own micro-batch; the pipeline's filtered taps and logits must equal those of
the full teacher (``FrozenLM``) evaluated on that micro-batch in this process.  With
``--archs DIR ...`` (Qwen2, Mistral, Gemma 2, Phi-3 teachers) the same checks run on each of them,
logits cut to the data tokenizer's ids (``--vocab``); with ``--documents DIR ...`` the same launch
also checks document attention: each rank's packed
windows go through a ZeRO-3 and a pipeline teacher built as training builds them, and every
document's logits and raw taps must equal those of the plain teacher on the document alone.  With
``--matching nccl`` point-to-point is matched as NCCL matches it (``harness.nccl_matching``).
"""

import argparse
import contextlib
import functools
import json
import os
import sys
from types import SimpleNamespace

import torch

TESTS = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, TESTS)  # for harness

from harness.nccl_matching import matched_as_nccl, tags_ignored  # noqa: E402
from harness.tiny import packed_documents, span_difference  # noqa: E402
from ted_ds import distributed  # noqa: E402
from ted_ds.architectures import decoder_layers, final_norm, load_hf_config  # noqa: E402
from ted_ds.documents import attn_implementation  # noqa: E402
from ted_ds.engine import DeepSpeedSettings, place_frozen  # noqa: E402
from ted_ds.errors import DistributedError  # noqa: E402
from ted_ds.filters import load_filter_bank  # noqa: E402
from ted_ds.models import load_teacher  # noqa: E402
from ted_ds.pipeline.layout import PipelineLayout  # noqa: E402
from ted_ds.pipeline.schedule import PipelineTeacher  # noqa: E402
from ted_ds.teacher import FrozenLM  # noqa: E402
from ted_ds.weights import load_model  # noqa: E402

TAPS = [2, 4]


def batch(seed: int, shape=(4, 16), vocab=500) -> torch.Tensor:
    return torch.randint(vocab, shape, generator=torch.Generator().manual_seed(seed))


def stage_parameters(ref: FrozenLM, pipe: PipelineTeacher) -> int:
    """What this rank's stage must hold, counted on the full teacher: its blocks, the embeddings on the
    first stage, the final norm and head on the last, and the filters of its taps."""
    start, end = pipe.layout.blocks[pipe.stage]
    modules = list(decoder_layers(ref.model)[start:end])
    if pipe.first:
        modules += [m for m in ref.model.modules() if isinstance(m, torch.nn.Embedding)]
    if pipe.last:
        modules += [final_norm(ref.model), ref.model.get_output_embeddings()]
    if ref.filters is not None:
        modules += [ref.filters.filters[i] for i in pipe.local_taps]
    return sum(p.numel() for m in modules for p in m.parameters())


def chunked_reference(ref: FrozenLM, ids: torch.Tensor, chunks: int) -> tuple:
    """The whole teacher's (taps, logits, top-k ids) on the pipeline's chunks, joined: the same
    matmul shapes as the pipeline's, so bit-identical outputs are expected."""
    with torch.no_grad():
        outs = [ref(c) for c in torch.tensor_split(ids, chunks)]
    joined = lambda parts: torch.cat(parts) if parts[0] is not None else None
    return ([torch.cat(t) for t in zip(*(o.taps for o in outs))], joined([o.logits for o in outs]),
            joined([o.topk_index for o in outs]))


def compare(teacher_dir, bank, stages, chunks, topk, logits_dtype, results, name, vocab=None, need_logits=True):
    config = load_hf_config(teacher_dir)
    layout = PipelineLayout.resolve(config, TAPS, bank, stages=stages, chunks=chunks, logits_topk=topk,
                                    logits_dtype=logits_dtype, vocab=vocab, need_logits=need_logits)
    pipe = PipelineTeacher(layout, teacher_dir, config, bank, 1.0)
    ref = FrozenLM(load_model(teacher_dir), TAPS, bank, need_logits, topk, vocab=vocab)
    exact = True
    max_diff = 0.0
    for step in range(2):
        ids = batch(1000 * step + distributed.rank())
        got = pipe(ids)
        taps, logits, index = chunked_reference(ref, ids, chunks)
        for a, b in zip(got.taps, taps):
            exact &= torch.equal(a, b)
            max_diff = max(max_diff, (a - b).abs().max().item())
        if need_logits:
            want = logits.to(logits_dtype).float()
            exact &= got.logits.shape == want.shape and torch.equal(got.logits, want)
            max_diff = max(max_diff, (got.logits - want).abs().max().item())
        else:
            exact &= got.logits is None
        if topk:
            exact &= torch.equal(got.topk_index, index)
    flags = torch.tensor([float(exact), max_diff, float(pipe.local_parameters()), float(stage_parameters(ref, pipe))])
    gathered = [torch.zeros_like(flags) for _ in range(distributed.world_size())]
    torch.distributed.all_gather(gathered, flags)
    full = sum(p.numel() for p in ref.parameters())
    results[name] = {"exact": all(bool(g[0]) for g in gathered), "max_diff": max(float(g[1]) for g in gathered),
                     "local_params": [float(g[2]) for g in gathered], "stage_params": [float(g[3]) for g in gathered],
                     "full_params": full}


def running_attention(frozen) -> str:
    """The attention implementation the model inside a placed teacher runs."""
    if hasattr(frozen, "engine"):  # ZeRO-3: the engine's module is the FrozenLM
        return attn_implementation(frozen.engine.module.model)
    return attn_implementation(getattr(frozen, "frozen", frozen).model)


def compare_documents(teacher_dir, results, stages, placements):
    """Document attention in ZeRO-3 and pipeline (``stages`` stages, 2 chunks) teachers, fp32, built by
    the run's own loader with ``teacher.attn_implementation: eager`` (recorded: what each placement runs)."""
    config = load_hf_config(teacher_dir)
    eos = config.eos_token_id
    ids, spans = packed_documents(eos, config.vocab_size, seed=distributed.rank())  # every rank its own windows
    reference = FrozenLM(load_model(teacher_dir), TAPS, None, True)
    with torch.no_grad():
        alone = lambda x: (lambda out: [out.logits, *out.taps])(reference(x))
    kind = config.model_type
    teacher = SimpleNamespace(path=teacher_dir, trust_remote_code=False, logits_topk=0, logits_top_p=None,
                              logits_dtype="fp32", pipeline_stages=stages, pipeline_layers=None, pipeline_chunks=2,
                              attn_implementation="eager")
    ds = DeepSpeedSettings.of({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                               "train_batch_size": 2 * distributed.world_size(), "zero_optimization": {"stage": 3}})
    for placement in placements:
        cfg = SimpleNamespace(teacher=SimpleNamespace(**vars(teacher), placement=placement),
                              train=SimpleNamespace(timeout_minutes=1.0, compile_blocks=False), tail_temperature=None)
        frozen = place_frozen(cfg, functools.partial(load_teacher, cfg), TAPS, None, True, ds, eos)
        out = frozen(ids)
        diff = torch.tensor([span_difference([out.logits, *out.taps], alone, ids, spans)])
        torch.distributed.all_reduce(diff, op=torch.distributed.ReduceOp.MAX)
        results[f"documents_{kind}_{placement}"] = {"max_diff": float(diff[0]), "attn": running_attention(frozen)}


def run_cases(args, bank) -> dict:
    """P=2 and P=world: chunks 1 and 2, full fp32 logits, bf16 top-8, taps only; then --archs and
    --documents (ZeRO-3 has no point-to-point: only the pipeline teacher under --matching nccl)."""
    results = {}
    world = distributed.world_size()
    for stages in sorted({2, world}):
        compare(args.teacher, bank, stages, 1, 0, torch.float32, results, f"P{stages}")
        compare(args.teacher, bank, stages, 2, 0, torch.float32, results, f"P{stages}_chunks2")
        compare(args.teacher, bank, stages, 2, 8, torch.bfloat16, results, f"P{stages}_chunks2_top8_bf16")
        compare(args.teacher, bank, stages, 2, 0, torch.float32, results, f"P{stages}_chunks2_taps",
                need_logits=False)
    for teacher_dir in args.archs:
        kind = load_hf_config(teacher_dir).model_type
        compare(teacher_dir, bank, 2, 2, 0, torch.float32, results, f"{kind}_P2_chunks2", args.vocab)
        compare(teacher_dir, bank, 2, 1, 8, torch.bfloat16, results, f"{kind}_P2_top8_bf16", args.vocab)
    placements = ("pipeline",) if args.matching == "nccl" else ("zero3", "pipeline")
    for teacher_dir in args.documents:
        compare_documents(teacher_dir, results, world, placements)
    return results


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--teacher", required=True)
    p.add_argument("--bank", required=True)
    p.add_argument("--out")
    p.add_argument("--fault", choices=("die", "shape"))
    p.add_argument("--documents", nargs="*", default=[], help="teacher dirs for the document-attention checks")
    p.add_argument("--archs", nargs="*", default=[], help="teacher dirs of other architectures")
    p.add_argument("--vocab", type=int, help="the data tokenizer's size, for --archs")
    p.add_argument("--matching", choices=("gloo", "nccl"), default="gloo",
                   help="nccl: point-to-point matched as NCCL matches it (harness.nccl_matching)")
    p.add_argument("--local_rank", type=int)
    args = p.parse_args()
    distributed.init(timeout_minutes=0.25 if args.fault else 5)
    config = load_hf_config(args.teacher)
    expect = {"kind": "linear", "in_dim": config.hidden_size, "out_dim": config.hidden_size, "layers": TAPS}
    bank = load_filter_bank(args.bank, expect, "bank")
    if args.fault:
        layout = PipelineLayout.resolve(config, TAPS, bank, stages=distributed.world_size())
        pipe = PipelineTeacher(layout, args.teacher, config, bank, 0.25)
        try:
            if args.fault == "die" and distributed.rank() == distributed.world_size() - 1:
                os._exit(17)  # the last stage dies before sending anything
            shape = (4, 16) if args.fault == "die" or distributed.rank() == 0 else (2, 16)
            pipe(batch(distributed.rank(), shape))
        except DistributedError as e:
            print(f"ted-ds: rank {distributed.rank()}: error: {e}", file=sys.stderr, flush=True)
            os._exit(2)
        os._exit(0)
    with matched_as_nccl() if args.matching == "nccl" else contextlib.nullcontext() as serial:
        results = run_cases(args, bank)
        if serial is not None:
            results["matching"] = {"tags_ignored": tags_ignored(), "operations": serial.ran}
    if distributed.rank() == 0:
        json.dump(results, open(args.out, "w"), indent=1)
    distributed.shutdown()
    distributed.leave(0)  # no C++ destructors at exit (see ted_ds.distributed.leave)


if __name__ == "__main__":
    main()
