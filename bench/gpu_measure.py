"""The GPU check's in-process measurements (no DeepSpeed): attention kernels, the frozen teacher's
forward, and a plain PyTorch training step of the student — the baseline the ted-ds step is held to.

Every timed call is waited for on the device (``ted_ds.distributed.synchronize``) before its clock
stops; each figure is the median over a few calls after a warm-up (compilation, allocation).

Attention FLOPs count the work the mask leaves: 4 · heads · head_dim per attended (query, key) pair
(QKᵀ and PV, two FLOPs per multiply-add each; softmax not counted), summed over the pairs a causal
mask allows within each document (Σ L(L+1)/2 over the documents of a row; one document: the causal
T(T+1)/2).  A kernel that computes masked pairs anyway (SDPA with a dense mask) thus shows a low
TFLOP/s for the same useful work.  Forward only.
"""

from __future__ import annotations

import functools
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from ted_ds.architectures import num_layers
from ted_ds.data import PackedShardDataset, collate
from ted_ds.distributed import synchronize
from ted_ds.documents import (
    attn_implementation,
    document_block_mask,
    document_positions,
    flex_on_cpu_uncompiled,
    for_model,
    restarted_positions,
)
from ted_ds.losses import lm_loss
from ted_ds.metrics import flops_per_token, matmul_parameters
from ted_ds.taps import tap_layers
from ted_ds.teacher import FrozenLM, ReplicatedTeacher
from ted_ds.weights import load_model

SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
EOS = 0  # the synthetic packed batch's end-of-document id


def timed(call, device: torch.device, warmup: int, steps: int) -> float:
    """Median seconds of ``call()`` over ``steps`` calls after ``warmup`` ones, each waited for on
    ``device``; the device's peak memory is counted from the first timed call on."""
    for _ in range(warmup):
        call()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        call()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_gib(device: torch.device) -> float | None:
    """Peak memory allocated since the last reset (``timed``); None on a CPU."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def packed_ids(batch: int, seq: int, documents: int, seed: int = 0) -> torch.Tensor:
    """(batch, seq) token ids holding ``documents`` EOS-separated documents per row, cut at random:
    the packed windows document attention is for."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(EOS + 1, EOS + 1000, (batch, seq), generator=g)
    for row in ids:
        row[torch.randperm(seq - 2, generator=g)[:documents - 1] + 1] = EOS
    return ids


def attended_pairs(document: torch.Tensor) -> int:
    """(query, key) pairs a causal mask within documents allows, over all rows of ``document`` (B, T)
    (each token's document number, ``restarted_positions``)."""
    return sum(int((n * (n + 1) // 2).sum()) for n in (torch.bincount(row) for row in document.cpu()))


def sdpa_backend(q, k, v, **kwargs) -> str | None:
    """The backend SDPA's dispatcher picks for these arguments (a private torch query; None without it)."""
    choose = getattr(torch, "_fused_sdp_choice", None)
    if choose is None:
        return None
    return torch.nn.attention.SDPBackend(choose(q, k, v, **kwargs)).name


def kernel_figures(call, reference: torch.Tensor, flops: float, device: torch.device, calls: int) -> dict:
    """ms per call, TFLOP/s of the useful work and the max abs difference from ``reference``."""
    out = call()
    seconds = timed(call, device, 1, calls)
    return {"ms": seconds * 1e3, "tflops": flops / seconds / 1e12,
            "max_abs_err": (out.float() - reference.float()).abs().max().item()}


def sdpa_figures(q, k, v, reference, flops: float, calls: int, **kwargs) -> dict:
    """One SDPA call as the dispatcher runs it, and ms per call under each backend alone (or why it refuses)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    call = lambda: F.scaled_dot_product_attention(q, k, v, **kwargs)
    out = {"backend": sdpa_backend(q, k, v, **kwargs),
           **kernel_figures(call, reference, flops, q.device, calls), "ms_by_backend": {}}
    for name in SDPA_BACKENDS:
        try:
            with sdpa_kernel([getattr(SDPBackend, name)]), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out["ms_by_backend"][name] = timed(call, q.device, 1, calls) * 1e3
        except RuntimeError as e:
            out["ms_by_backend"][name] = f"refused: {str(e).split('.')[0]}"
    return out


def repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, kv_heads, T, D) → (B, heads, T, D), each KV head repeated for its group of query heads: what
    transformers does before SDPA with a mask (``enable_gqa`` with a mask leaves only the math kernel)."""
    return x.repeat_interleave(heads // x.shape[1], dim=1)


def attention(heads: int, kv_heads: int, head_dim: int, batch: int, seq: int, documents: int,
              device: torch.device, dtype: torch.dtype, calls: int) -> dict:
    """Causal SDPA, SDPA with ted_ds.documents' dense document mask, and FlexAttention with its
    BlockMask (the project's path: transformers' compiled kernel on a GPU, uncompiled on a CPU), on
    random q, k, v of one attention shape; errors against SDPA with the dense mask of the same pairs."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, h, seq, head_dim, generator=g).to(device, dtype) for h in (heads, kv_heads, kv_heads))
    ids = packed_ids(batch, seq, documents).to(device)
    document = restarted_positions(ids, EOS)[1]
    doc_mask = document_positions(ids, EOS, dtype)[1]
    causal_mask = document_positions(torch.full_like(ids, EOS + 1), EOS, dtype)[1]  # no EOS: one document a row
    per_pair = 4 * heads * head_dim
    causal_flops, doc_flops = per_pair * attended_pairs(torch.zeros_like(ids)), per_pair * attended_pairs(document)
    k_all, v_all = repeat_kv(k, heads), repeat_kv(v, heads)  # a mask: KV heads repeated, as transformers does
    sdpa = lambda mask: F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)
    doc_reference = sdpa(doc_mask)
    block_mask = document_block_mask(document)
    flex = lambda: flex_on_cpu_uncompiled(torch.nn.Module().eval(), q, k, v, block_mask)[0].transpose(1, 2)
    return {"heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "batch": batch, "seq_len": seq,
            "documents_per_row": documents, "dtype": str(dtype).removeprefix("torch."),
            "causal": sdpa_figures(q, k, v, sdpa(causal_mask), causal_flops, calls, is_causal=True, enable_gqa=True),
            "document_dense": sdpa_figures(q, k_all, v_all, doc_reference, doc_flops, calls, attn_mask=doc_mask),
            "document_flex": {"compiled": device.type != "cpu",
                              **kernel_figures(flex, doc_reference, doc_flops, device, calls)}}


def windows(data: str, seq: int, micro_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) of the first ``micro_batch`` training windows of a ted-prep build: real packed
    documents."""
    return collate(PackedShardDataset(data, "train", seq), list(range(micro_batch)))


TEACHER_VARIANTS = ((None, False), (None, True), ("flex_attention", True))  # (attn_implementation, documents)


def teacher_forwards(path: str, every: int, data: str, seq: int, micro_batches: tuple[int, ...], eos: int,
                     vocab: int, device: torch.device, dtype: torch.dtype, steps: int, peak_flops: float) -> list[dict]:
    """The frozen teacher as a run builds it (FrozenLM with its taps every ``every`` layers, logits cut to
    ``vocab``, ReplicatedTeacher) on real windows: ms per call and per 4,096 tokens, MFU of the forward
    FLOPs (ted_ds.metrics), with document attention off and on, under the model's default attention
    (None) and FlexAttention."""
    model = load_model(path, dtype=dtype, device=device)
    default, layers = attn_implementation(model), tap_layers(every, num_layers(model.config))
    flops = flops_per_token(matmul_parameters(model), model.config, seq, training=False)
    rows = []
    for impl, documents in TEACHER_VARIANTS:
        model.set_attn_implementation(impl or default)
        frozen = FrozenLM(model, layers, None, True, documents=for_model(model, eos if documents else None, dtype),
                          vocab=vocab)
        teacher = ReplicatedTeacher(frozen, device)
        for mb in micro_batches:
            ids = windows(data, seq, mb)[0].to(device)
            seconds = timed(functools.partial(teacher, ids), device, 1, steps)
            rows.append({"attn_implementation": impl or default, "document_attention": documents, "micro_batch": mb,
                         "documents_per_window": float((ids == eos).sum()) / mb + 1, "ms": seconds * 1e3,
                         "ms_per_4096_tokens": seconds * 1e3 * 4096 / (mb * seq),
                         "mfu": mfu(flops * mb * seq / seconds, peak_flops)})
        frozen.recorder.remove()
    return rows


def mfu(flops_per_s: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation; None on a device without a known peak (ted_ds.metrics.device_peak_flops)."""
    return flops_per_s / peak_flops if peak_flops else None


def plain_step(model, optimizer, input_ids: torch.Tensor, labels: torch.Tensor, compute: torch.dtype,
               clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the plain PyTorch baseline: forward under autocast to ``compute`` (the fp32 weights are
    the master copy), ted-ds's chunked LM loss (ted_ds.losses.lm_loss, what ted-ds's student step
    computes), backward, the gradient clipped to ``clip`` as ted-ds clips it, optimizer step. Returns
    the loss and the gradient norm before clipping."""
    with torch.autocast(input_ids.device.type, dtype=compute, enabled=compute != torch.float32):
        logits = model(input_ids=input_ids, use_cache=False).logits
    loss = lm_loss(logits, labels)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach(), norm


def plain_steps(path: str, data: str, seq: int, micro_batches: tuple[int, ...], device: torch.device,
                compute: torch.dtype, steps: int, peak_flops: float | None, optim: dict) -> dict[int, dict]:
    """The baseline a ted-ds student step is held to (BENCHMARKS: student_vs_plain): the same HF model
    with fp32 weights trained by plain PyTorch (``plain_step``: bf16 autocast on a GPU, the same chunked
    loss, clipping) with AdamW — fused on CUDA — of the run's settings (``optim``: lr, betas, eps,
    weight_decay, clip), no DeepSpeed, on the same windows.  Per micro-batch: step seconds, tokens/s,
    MFU (3 × forward FLOPs, ted_ds.metrics), peak memory of the timed steps."""
    model = load_model(path, dtype=torch.float32, device=device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=optim["lr"], betas=optim["betas"], eps=optim["eps"],
                                  weight_decay=optim["weight_decay"], fused=device.type == "cuda" or None)
    flops = flops_per_token(matmul_parameters(model), model.config, seq, training=True)
    out = {}
    for mb in micro_batches:
        input_ids, labels = (t.to(device) for t in windows(data, seq, mb))
        step = functools.partial(plain_step, model, optimizer, input_ids, labels, compute, optim["clip"])
        seconds = timed(step, device, 2, steps)
        out[mb] = {"step_s": seconds, "tokens_per_s": mb * seq / seconds,
                   "mfu": mfu(flops * mb * seq / seconds, peak_flops), "peak_gpu_gib": peak_gib(device)}
    return out
