"""Will the run fit: the bytes each rank must hold, from shapes alone, checked before any load.

``rank_floor_bytes`` is a lower bound of what one rank holds under a teacher placement: its teacher
share in the compute dtype, its ZeRO-3 shard of the student (weights, master copy, Adam moments,
gradients), the largest student parameter gathered whole with its gradient, ZeRO-3's gradient
bucket, the step's (tokens × vocabulary) logits and, under a pipeline teacher, the one chunk of
logits its last stage has in flight to another rank.  ``check_fits`` refuses a run whose floor
already exceeds the memory a rank can see (on its own GPU, chosen by ``ted_ds.distributed.device``),
and a rank count that does not fit the pipeline — one line each, before any weights are read.  The
scale rehearsal (``python -m bench scale``) divides measured peaks by the same floor.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ted_ds.architectures import decoder_layers, hidden_size, meta_model, vocab_size
from ted_ds.config import check_pipeline_world
from ted_ds.errors import ConfigError

if TYPE_CHECKING:
    from ted_ds.engine import DeepSpeedSettings

GIB = 2**30
CPU = torch.device("cpu")


def student_bytes_per_param(dtype: torch.dtype) -> int:
    """ZeRO-3 state per trained parameter: fp32 runs hold weights, gradients and two Adam moments
    (4 × 4 bytes); bf16 runs add the bf16 weights to fp32 master, moments and gradients (2 + 4 × 4)."""
    return 16 if dtype == torch.float32 else 18


def teacher_share(teacher_config, placement: str, world: int, stages: int, explicit: list[int] | None) -> int:
    """Teacher parameters one rank holds: all (replicated), 1/W plus the largest parameter gathered
    for its forward (zero3), its largest stage (pipeline)."""
    model = meta_model(teacher_config)
    total = sum(p.numel() for p in model.parameters())
    if placement == "replicated":
        return total
    if placement == "zero3":  # its slice, and each parameter gathered whole while it computes
        return math.ceil(total / world) + max(p.numel() for p in model.parameters())
    from ted_ds.pipeline.layout import stage_blocks

    blocks = [sum(p.numel() for p in b.parameters()) for b in decoder_layers(model)]
    inside = {id(p) for b in decoder_layers(model) for p in b.parameters()}
    embeddings = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    first = sum(p.numel() for p in model.parameters() if id(p) in embeddings - inside)  # embeddings
    last = sum(p.numel() for p in model.parameters() if id(p) not in embeddings | inside)  # norm, head
    head = model.get_output_embeddings()
    if head is not None and id(head.weight) in embeddings:  # tied: the last stage holds its own copy
        last += head.weight.numel()
    bounds = stage_blocks(teacher_config, stages, explicit)
    return max(sum(blocks[a:b]) + first * (s == 0) + last * (s == len(bounds) - 1)
               for s, (a, b) in enumerate(bounds))


def reduce_bucket_elements(ds: dict) -> int:
    """ZeRO-3's gradient bucket (DeepSpeed's default 5e8 elements): filled, and so held, by large models."""
    return int(ds.get("zero_optimization", {}).get("reduce_bucket_size", 5e8))


def chunk_tokens(micro_batch: int, seq_len: int, chunks: int) -> int:
    """Tokens of the largest pipeline chunk: the micro-batch's rows are cut into ``chunks``."""
    return math.ceil(micro_batch / chunks) * seq_len


def rank_floor_bytes(teacher_config, student_config, placement: str, world: int, stages: int,
                     explicit: list[int] | None, dtype: torch.dtype, tokens: int, bucket_elements: int = 0,
                     chunk: int = 0) -> float:
    """A lower bound of one rank's memory for this run (module docstring); ``bucket_elements``: the
    ZeRO-3 gradient bucket, counted up to the student's size; ``chunk``: tokens of a pipeline chunk,
    whose logits the last stage makes and sends to their owner one at a time (the schedule waits
    for each tick's sends), on top of its own micro-batch's."""
    student = meta_model(student_config)
    n_student = sum(p.numel() for p in student.parameters())
    largest = max(p.numel() for p in student.parameters())
    width = torch.finfo(dtype).bits // 8
    vocab = vocab_size(student_config)
    floor = (student_bytes_per_param(dtype) * n_student / world + (width + 4) * largest + tokens * vocab * (width + 4)
             + width * min(bucket_elements, n_student))
    if teacher_config is not None:
        floor += width * teacher_share(teacher_config, placement, world, stages, explicit) + tokens * vocab * width
        if placement == "pipeline" and stages > 1:
            floor += chunk * vocab * width
    return floor


def visible_bytes(device: torch.device, local_ranks: int) -> tuple[float, str]:
    """Memory one rank can use, and where it is: its GPU's free memory, or its share of the host's."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, "GPU"
    import psutil

    return psutil.virtual_memory().available / local_ranks, "host"


def check_fits(p, ds: DeepSpeedSettings, world: int, local_ranks: int, with_teacher: bool, trained_heads: int = 0,
               device: torch.device = CPU) -> None:
    """Refuse, in one line, a run that cannot fit the ranks it starts on (``ds``: its DeepSpeed
    settings; ``with_teacher``: the teacher is placed by ``teacher.placement`` in this run;
    ``trained_heads``: stage 1's trainable heads, one norm + unembedding each, trained under ZeRO-3;
    ``device``: the rank's own)."""
    cfg = p.cfg
    t = cfg.teacher
    teacher_config = p.teacher_config if with_teacher else None
    if teacher_config is not None and t.placement == "pipeline":
        check_pipeline_world(t.pipeline_stages, world)
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len
    need = rank_floor_bytes(teacher_config, p.student_config, t.placement, world, t.pipeline_stages,
                            t.pipeline_layers, ds.dtype, tokens, reduce_bucket_elements(ds.config),
                            chunk_tokens(cfg.train.micro_batch_size, cfg.data.seq_len, t.pipeline_chunks))
    if trained_heads and p.teacher_config is not None:
        head = vocab_size(p.teacher_config) * hidden_size(p.teacher_config)
        need += student_bytes_per_param(ds.dtype) * trained_heads * head / world
    have, where = visible_bytes(device, local_ranks)
    if need > have:
        hint = ("use teacher.placement zero3 or pipeline, more ranks, " if teacher_config is not None
                and t.placement == "replicated" else "use more ranks, ")
        raise ConfigError(f"this run needs at least {need / GIB:.1f} GiB per rank (teacher share, student ZeRO-3 "
                          f"shard, logits) but a rank sees {have / GIB:.1f} GiB of {where} memory; {hint}"
                          "a smaller micro_batch_size, or the offload config (ds_configs/zero3_offload.json)")
