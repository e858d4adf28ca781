"""What each command trains: the TED stages and the baselines, as (engine, frozen side, loss).

``plan`` reads configs, manifest and tokenizers from disk and checks that everything fits
together before any process group exists.  ``build_distill`` and ``build_filter_learning`` turn
a plan into a ``Recipe``: the DeepSpeed engine of the trained module, the frozen model, and the
loss of one micro-batch.  The trainer only ever sees a ``Recipe``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from data_prep.tokenizer import TOKENIZER_FILES, load_tokenizer, vocab_fingerprint
from data_prep.verify import verify_dataset
from ted_ds import distributed
from ted_ds.architectures import (
    hidden_size,
    load_hf_config,
    max_positions,
    meta_model,
    model_from_config,
    num_layers,
    teacher_blocks_config,
    vocab_size,
)
from ted_ds.config import DataConfig, DistillConfig, RunConfig
from ted_ds.data import MicroBatch
from ted_ds.documents import (
    DocumentAttention,
    check_document_attention,
    check_trainable_attention,
    for_model,
    forward_kwargs,
)
from ted_ds.engine import build_frozen, build_trained_engine, compute_dtype, wsd_decay_steps
from ted_ds.errors import ConfigError
from ted_ds.filters import FilterBank, check_filter_bank, load_filter_bank, model_record
from ted_ds.heads import TaskHead
from ted_ds.hub import with_local_models
from ted_ds.losses import ObjectiveWeights, distill_objective, lm_loss, tap_lm_losses, trained_head_lm_loss
from ted_ds.metrics import flops_per_token, matmul_parameters
from ted_ds.taps import TapRecorder, tap_pairs
from ted_ds.teacher import Teacher, TeacherOutput
from ted_ds.weights import fingerprint, load_model, load_teacher_blocks


@dataclass
class Plan:
    """Everything checked up front: model shapes, taps, data, step budget."""

    cfg: RunConfig
    teacher_config: object | None
    student_config: object
    pairs: list[tuple[int, int]]
    filter_dim: int | None
    manifest: dict
    """The first source's manifest (every source shares its tokenizer)."""
    total_steps: int
    manifests: list[dict]
    """One per source of ``cfg.data.blend``."""
    document_eos: int | None = None  # data.document_attention: the data's EOS id, else None
    vocabularies: str = ""  # one line: the vocabulary sizes compared (check_vocabularies)
    models: dict[str, dict] = field(default_factory=dict)
    """What the filter banks of this run are learned on, per side ("teacher", "student"): learned_on."""
    cache: dict | None = None  # teacher.cache's manifest, verified and matched to this run (check_cache)

    @property
    def teacher_layers(self) -> list[int]:
        return [t for t, _ in self.pairs]

    @property
    def student_layers(self) -> list[int]:
        return [s for _, s in self.pairs]


SPECIAL_ROLES = ("eos", "bos", "pad", "unk")


def _check_tokenizer(model_dir: str, manifest: dict, what: str, data_dir: str) -> None:
    """A model's tokenizer fits the data's when both map every id below the data's vocabulary size to the
    same token (ids past it, the padding of an embedding, are never used); special-token roles that
    differ (EOS, BOS, PAD, UNK) are a one-line warning, any other difference a one-line error."""
    if not any(os.path.isfile(os.path.join(model_dir, f)) for f in TOKENIZER_FILES):
        return
    tok = load_tokenizer(model_dir)
    if vocab_fingerprint(tok) == manifest["tokenizer"]["vocab_sha256"]:
        return
    size = manifest["vocab_size"]
    data_tok_dir = os.path.join(data_dir, "tokenizer")
    if not os.path.isdir(data_tok_dir):  # nothing to compare id by id with
        raise ConfigError(f"{what} {model_dir} has a different tokenizer than the data "
                          f"({manifest['tokenizer']['name']}) and {data_tok_dir} is missing to compare them id by id")
    data_tok = load_tokenizer(data_tok_dir)
    conflict = _first_conflict(data_tok.get_vocab(), tok.get_vocab(), size)
    if conflict is not None:
        i, want, got = conflict
        raise ConfigError(f"{what} {model_dir} has a different tokenizer than the data "
                          f"({manifest['tokenizer']['name']}): id {i} is {got!r} there but {want!r} in the data's; "
                          f"teacher, student and shards must map the {size} ids below the data's vocabulary size "
                          "alike")
    roles = [f"{r} {getattr(data_tok, f'{r}_token')!r} vs {getattr(tok, f'{r}_token')!r}" for r in SPECIAL_ROLES
             if getattr(data_tok, f"{r}_token_id") != getattr(tok, f"{r}_token_id")]
    if roles:
        warnings.warn(f"{what} {model_dir}: same {size} token ids as the data's tokenizer, but special-token roles "
                      f"differ (data vs {what}: {'; '.join(roles)})", stacklevel=2)


def _first_conflict(data_vocab: dict[str, int], vocab: dict[str, int], size: int):
    """(id, data's token, model's token) of the first id below ``size`` the two maps disagree on, or None."""
    by_id = lambda v: {i: t for t, i in v.items() if i < size}
    want, got = by_id(data_vocab), by_id(vocab)
    for i in range(size):
        if want.get(i) != got.get(i):
            return i, want.get(i), got.get(i)
    return None


def check_vocabularies(manifest: dict, models: dict[str, tuple]) -> str:
    """Every model's embedding has a row for each of the data tokenizer's ids (more rows are fine:
    KD, top-k and the stage-1 head read logits sliced to the tokenizer's ids). ``models``: what ->
    (config or None, path). Returns, or raises with, one line naming the sizes compared."""
    size = manifest["vocab_size"]
    rows = {what: (vocab_size(conf), path) for what, (conf, path) in models.items() if conf is not None}
    line = (f"vocabularies: data tokenizer {size} ids; "
            + ", ".join(f"{what} {n} embedding rows" for what, (n, _) in rows.items()))
    for what, (n, path) in rows.items():
        if n < size:
            raise ConfigError(f"{what} {path}: {n} embedding rows cannot hold the data tokenizer's {size} ids ({line})")
    return line


def check_sources(data: DataConfig) -> list[dict]:
    """Every source's manifest, once the sources are known to mix: one tokenizer, one BOS setting,
    and a validation split in each or in none (evaluation covers every source or is off)."""
    sources = data.blend
    manifests = [verify_dataset(s.path, checksums=False) for s in sources]
    first, m0 = sources[0], manifests[0]
    for src, m in zip(sources[1:], manifests[1:]):
        if m["tokenizer"]["vocab_sha256"] != m0["tokenizer"]["vocab_sha256"]:
            raise ConfigError(f"data sources {first.name} and {src.name} were built with different tokenizers "
                              f"({m0['tokenizer']['name']} vs {m['tokenizer']['name']}); rebuild one with the other's")
        if m.get("add_bos", False) != m0.get("add_bos", False):
            with_bos, without = (first, src) if m0.get("add_bos", False) else (src, first)
            raise ConfigError(f"data sources {with_bos.name} and {without.name} differ in BOS: {with_bos.name} "
                              "was built with --add-bos and the other without; rebuild one to match")
    if any(m["shards"]["valid"] for m in manifests):
        for src, m in zip(sources, manifests):
            tokens = m["totals"]["valid"]["tokens"]
            if tokens < data.seq_len + 1:
                raise ConfigError(f"data source {src.name} ({src.path}): valid split has {tokens} tokens, too few "
                                  f"for one window of data.seq_len {data.seq_len} + 1; every source needs one "
                                  "for evaluation (rebuild with ted-prep build --valid-fraction > 0)")
    return manifests


def plan(cfg: RunConfig, filters_for: str | None = None) -> Plan:
    """Validate a run against the files it names; ``filters_for`` is set for stage 1.  Every shard
    is checked against the manifest here, before any process group: a damaged one is named."""
    manifests = check_sources(cfg.data)
    manifest = manifests[0]
    needs_teacher = cfg.uses_teacher or cfg.student.init_from_teacher is not None or filters_for is not None
    cfg = with_local_models(cfg, teacher=needs_teacher)  # hub ids → directories of the local HF cache
    t, s = cfg.teacher, cfg.student
    teacher_config = load_hf_config(t.path, t.trust_remote_code) if t.path and needs_teacher else None
    if cfg.train.init_from:
        student_config = init_from_config(cfg.train.init_from, s.trust_remote_code)
    elif s.path:
        student_config = load_hf_config(s.path, s.trust_remote_code)
    elif s.config:
        student_config = load_hf_config(s.config, s.trust_remote_code)
    else:
        student_config = teacher_blocks_config(teacher_config, s.init_from_teacher)
    for what, conf in (("teacher", teacher_config), ("student", student_config)):
        if conf is None:
            continue
        limit = max_positions(conf)
        if limit is not None and cfg.data.seq_len > limit:
            raise ConfigError(f"data.seq_len {cfg.data.seq_len} exceeds the {what}'s {limit} positions")
    vocab_line = check_vocabularies(manifest, {"teacher": (teacher_config, t.path),
                                               "student": (student_config, s.path or s.config or cfg.train.init_from)})
    hf_start = cfg.train.init_from if cfg.train.init_from and _is_hf_dir(cfg.train.init_from) else s.path
    for what, path in (("teacher", t.path if teacher_config is not None else None), ("student", hf_start)):
        if path:
            _check_tokenizer(path, manifest, what, cfg.data.blend[0].path)  # sources share one tokenizer
    uses_teacher_geometry = cfg.uses_teacher or filters_for is not None
    if uses_teacher_geometry and teacher_config is None:
        raise ConfigError("this command needs teacher.path")
    pairs: list[tuple[int, int]] = []
    if cfg.uses_layers or filters_for is not None:
        pairs = tap_pairs(cfg.distill, num_layers(teacher_config), num_layers(student_config))
    filter_dim = None
    if teacher_config is not None:
        filter_dim = cfg.distill.filter_dim or hidden_size(teacher_config)
        if filters_for is not None and filter_dim != hidden_size(teacher_config):
            raise ConfigError(f"distill.filter_dim {filter_dim} must equal the teacher's hidden size "
                              f"{hidden_size(teacher_config)}: stage 1 reads filtered states with the teacher's head")
    tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
    total = cfg.train.steps or math.ceil(cfg.train.tokens / tokens_per_step)
    if cfg.optim.schedule == "wsd" and cfg.optim.warmup_steps + wsd_decay_steps(cfg, total) > total:
        raise ConfigError(f"optim.schedule wsd: {cfg.optim.warmup_steps} warmup + {wsd_decay_steps(cfg, total)} decay "
                          f"steps (optim.decay_fraction {cfg.optim.decay_fraction:g}) exceed the run's {total} steps")
    document_eos = _document_eos(cfg, manifest, teacher_config, student_config)
    sides = [filters_for] if filters_for else ["teacher", "student"] if cfg.distill.method == "ted" else []
    if filters_for is None:  # stage 1 trains filters only; the models run without gradients
        check_trainable_attention(meta_model(student_config), "student", on_cpu=not torch.cuda.is_available())
    p = Plan(cfg, teacher_config, student_config, pairs, filter_dim, manifest, total, manifests, document_eos,
             vocab_line, {side: learned_on(cfg, student_config, side) for side in sides},
             check_cache(cfg, manifest) if cfg.logits_from_cache else None)
    if cfg.distill.method == "ted" and filters_for is None:
        check_banks(p)
    return p


def learned_on(cfg: RunConfig, student_config, side: str) -> dict:
    """The model a filter bank of ``side`` is learned on, as the bank's metadata records it (model_record):
    a directory by the digest of its weights; a student built from a checkpoint, teacher blocks or at
    random by how it is built (what load_student builds it from)."""
    t, s = cfg.teacher, cfg.student
    start = t.path if side == "teacher" else cfg.train.init_from or s.path
    if start and _is_hf_dir(start):
        return model_record(start)
    if start:  # a checkpoint: its record of the run and step is what names it
        from ted_ds.export import resolve_checkpoint

        ckpt_dir, tag = resolve_checkpoint(start, None)
        with open(os.path.join(ckpt_dir, tag, "trainer_state.json")) as f:
            return {"name": os.path.join(ckpt_dir, tag), "digest": _digest(f.read())}
    if s.init_from_teacher is not None:
        return {"name": f"blocks {s.init_from_teacher} of {os.path.abspath(t.path)}",
                "digest": _digest(fingerprint(t.path), s.init_from_teacher)}
    config = {k: v for k, v in student_config.to_dict().items() if k != "transformers_version"}
    return {"name": f"a random student (train.seed {cfg.train.seed})", "digest": _digest(config, cfg.train.seed)}


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def expected_bank(p: Plan, side: str) -> dict:
    """The metadata a stage-2 bank of ``side`` must have: filter kind, dimensions, layers, model."""
    config, layers = (p.teacher_config, p.teacher_layers) if side == "teacher" else (p.student_config,
                                                                                      p.student_layers)
    return {"kind": p.cfg.distill.filter, "in_dim": hidden_size(config), "out_dim": p.filter_dim, "layers": layers,
            "model": p.models[side]}


def check_banks(p: Plan) -> None:
    """Method ted: both stage-1 banks exist and were learned for this run (filters, taps, models)."""
    for side in ("teacher", "student"):
        path = getattr(p.cfg, side).filters
        if not path:
            raise ConfigError(f"method ted needs {side}.filters (run `ted-ds learn-filters --model {side}` first)")
        if p.cfg.uses_layers:
            check_filter_bank(path, expected_bank(p, side), f"{side}.filters")
        elif not os.path.isdir(path):
            raise ConfigError(f"{side}.filters: filter bank not found: {path}")


def check_cache(cfg: RunConfig, manifest: dict) -> dict:
    """teacher.cache's manifest, once every file checks out against it (sizes and sha256) and it was made
    with this run's teacher weights, tokenizer, data, seq_len, document attention and value dtype, with k
    ≥ teacher.logits_topk; one line naming the first difference otherwise."""
    from ted_ds.cache import format as cache_format

    cached = cache_format.verify(cfg.teacher.cache)
    sources = {cache_format.source_key(s.path)[0]: (s.name, s.path) for s in cfg.data.blend}
    run = cache_format.identity(cfg, cfg.teacher.path, manifest, cfg.teacher.logits_topk)
    why = cache_format.mismatch(cfg.teacher.cache, cached, run, sources)
    if why is not None:
        raise ConfigError(why)
    return cached


def _document_eos(cfg: RunConfig, manifest: dict, teacher_config, student_config) -> int | None:
    """data.document_attention: the data's EOS id, once every model that runs can take packed documents."""
    if not cfg.data.document_attention:
        return None
    if manifest.get("eos_token_id") is None:
        raise ConfigError(f"data.document_attention: {cfg.data.blend[0].path} records no EOS token id, so "
                          "documents cannot be told apart")
    for what, conf in (("teacher", teacher_config), ("student", student_config)):
        if conf is not None:
            check_document_attention(meta_model(conf), what)
    return int(manifest["eos_token_id"])


# ----------------------------------------------------------------------------- models
def load_teacher(cfg: RunConfig, **placement) -> nn.Module:
    """The teacher's weights as ``placement`` says (dtype, device, zero_config: see weights.load_model)."""
    return load_model(cfg.teacher.path, cfg.teacher.trust_remote_code, **placement)


def _is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def init_from_config(path: str, trust_remote_code: bool):
    """The student's HF config for ``train.init_from``: an HF directory's, or the one a checkpoint
    recorded (its trainer_state.json); one line if ``path`` is neither."""
    import json

    from transformers import AutoConfig

    from ted_ds.export import resolve_checkpoint

    if not os.path.exists(path):
        raise ConfigError(f"train.init_from: {path} does not exist (an HF directory or a run's checkpoint)")
    if _is_hf_dir(path):
        return load_hf_config(path, trust_remote_code)
    ckpt_dir, tag = resolve_checkpoint(path, None)
    with open(os.path.join(ckpt_dir, tag, "trainer_state.json")) as f:
        run = json.load(f)["run"]
    if not run.get("student_config") or not os.path.basename(ckpt_dir).startswith("distill-"):
        raise ConfigError(f"train.init_from: {ckpt_dir}/{tag} is not a distill checkpoint (no student in it)")
    return AutoConfig.for_model(**run["student_config"])


def init_from_hf_dir(cfg: RunConfig) -> str:
    """``train.init_from`` as an HF directory: itself, or (a checkpoint) its student exported once by
    rank 0 into ``<out_dir>/init-from-<tag>`` with ``ted-ds export``'s own check; every rank waits."""
    from ted_ds.export import export_checkpoint, resolve_checkpoint

    if _is_hf_dir(cfg.train.init_from):
        return cfg.train.init_from
    ckpt_dir, tag = resolve_checkpoint(cfg.train.init_from, None)
    target = os.path.join(cfg.train.out_dir, f"init-from-{tag}")
    if distributed.rank() == 0 and not _is_hf_dir(target):
        os.makedirs(cfg.train.out_dir, exist_ok=True)
        for line in export_checkpoint(os.path.join(ckpt_dir, tag), target):
            print(f"ted-ds: train.init_from: {line}", flush=True)
    distributed.barrier()
    return target


def load_student(p: Plan, **placement) -> nn.Module:
    """The student from another run (``train.init_from``), its own directory, teacher blocks (reading
    only those), or random.

    A random student is built whole in fp32 on every rank (then cast and partitioned): only small
    students start from scratch, and so every rank and the single-process reference agree."""
    s = p.cfg.student
    if p.cfg.train.init_from:
        return load_model(init_from_hf_dir(p.cfg), s.trust_remote_code, **placement)
    if s.path:
        return load_model(s.path, s.trust_remote_code, **placement)
    if s.init_from_teacher is not None:
        return load_teacher_blocks(p.cfg.teacher.path, s.init_from_teacher, p.cfg.teacher.trust_remote_code,
                                     **placement)
    model = model_from_config(p.student_config, p.cfg.train.seed)
    return model.to(placement.get("dtype", torch.float32))


class StudentWithFilters(nn.Module):
    """The trained module of stage 2: the HF student and the filters on its tapped layers."""

    def __init__(self, model: nn.Module, layers: list[int], filters: FilterBank | None,
                 documents: DocumentAttention | None = None):
        super().__init__()
        self.model = model
        self.filters = filters
        self.documents = documents  # data.document_attention (None: off)
        self.recorder = TapRecorder(model, layers) if layers else None

    def forward(self, input_ids: torch.Tensor):
        logits = self.model(input_ids=input_ids, use_cache=False,
                            **forward_kwargs(self.documents, input_ids)).logits  # (B, T, V)
        taps = self.recorder.take() if self.recorder else None
        if taps is not None and self.filters is not None:
            taps = self.filters(taps)  # (B, T, D_filter) each
        return logits, taps


@dataclass
class Recipe:
    name: str
    engine: object  # DeepSpeedEngine of the trained module
    frozen: Teacher | None  # a teacher placement (ted_ds.teacher), or None
    loss: Callable  # (MicroBatch) -> dict of terms with "loss"
    eval_loss: Callable  # (input_ids, labels) -> scalar tensor
    flops_per_token: float  # trained forward+backward + frozen forward, for MFU
    trained_model: nn.Module  # what `finish` saves


def lwd_map(d: DistillConfig, d_s: int, d_t: int, layers: list[int], seed: int) -> FilterBank:
    """LWD's trainable student map into the teacher's raw hidden space, started as ``distill.lwd_map_init`` says."""
    return FilterBank(d.filter, d_s, d_t, layers, seed=seed, init=d.lwd_map_init)


def build_distill(p: Plan, ds: dict) -> Recipe:
    """Stage 2 (ted), or a baseline (lwd, kd, lm), by ``distill.method``."""
    cfg = p.cfg
    method = cfg.distill.method
    student = load_student(p, dtype=compute_dtype(ds), zero_config=ds)
    if cfg.student.activation_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    d_s = hidden_size(p.student_config)
    student_filters, teacher_filters = None, None
    if method == "ted" and cfg.uses_layers:
        student_filters, teacher_filters = (load_filter_bank(getattr(cfg, side).filters, expected_bank(p, side),
                                                             f"{side}.filters") for side in ("student", "teacher"))
    elif method == "lwd" and cfg.uses_layers:
        student_filters = lwd_map(cfg.distill, d_s, hidden_size(p.teacher_config), p.student_layers, cfg.train.seed)
    if student_filters is not None:  # DeepSpeed casts no module whose student is already partitioned
        student_filters = student_filters.to(compute_dtype(ds))
    trained = StudentWithFilters(student, p.student_layers if cfg.uses_layers else [], student_filters,
                                 for_model(student, p.document_eos, compute_dtype(ds)))
    flops = flops_per_token(matmul_parameters(student), p.student_config, cfg.data.seq_len, True)
    engine = build_trained_engine(cfg, trained, ds, p.total_steps)
    frozen = None
    if cfg.runs_teacher:
        frozen = build_frozen(cfg, functools.partial(load_teacher, cfg), p.teacher_layers if cfg.uses_layers else [],
                              teacher_filters, cfg.uses_logits and not cfg.logits_from_cache, ds, p.document_eos,
                              p.manifest["vocab_size"])
        flops += flops_per_token(matmul_parameters(meta_model(p.teacher_config)), p.teacher_config,
                                  cfg.data.seq_len, False)
    cache = None
    if cfg.logits_from_cache:
        from ted_ds.cache.format import CacheRows, source_key

        cache = CacheRows(cfg.teacher.cache, p.cache, [source_key(s.path)[0] for s in cfg.data.blend],
                          cfg.teacher.logits_topk)
    d = cfg.distill
    weights = ObjectiveWeights(d.alpha, d.beta, d.temperature, d.layer_loss, p.manifest["vocab_size"], d.divergence,
                               d.divergence_mix)

    def loss(batch: MicroBatch):
        t = teacher_side(frozen, cache, batch)
        logits, taps = engine(batch.input_ids)
        return distill_objective(logits, taps, batch.labels, t and t.logits, t and t.taps, weights, t and t.topk_index)

    def eval_loss(input_ids, labels):
        logits, _ = engine(input_ids)
        return lm_loss(logits, labels)

    return Recipe(f"distill-{method}", engine, frozen, loss, eval_loss, flops, trained)


def teacher_side(frozen: Teacher | None, cache, batch: MicroBatch) -> TeacherOutput | None:
    """The teacher's outputs for a micro-batch: taps (and logits) from the running teacher; the logits from
    the cache (``CacheRows``) when the run has one, found by the batch's sample indices."""
    t = frozen(batch.input_ids) if frozen is not None else None
    if cache is None:
        return t
    values, index = (x.to(batch.input_ids.device) for x in cache.read(batch.samples))
    return TeacherOutput(t and t.taps, values, index)


class FiltersWithHeads(nn.Module):
    """The trained module of stage 1 with ``distill.filter_head: trainable``: the bank and one
    next-token head per tap (copies of the teacher's final norm + unembedding). Only the bank is
    kept after stage 1; the heads exist to train it."""

    def __init__(self, bank: FilterBank, head: nn.Module):
        super().__init__()
        self.bank = bank
        self.heads = nn.ModuleList(copy.deepcopy(head).requires_grad_(True) for _ in bank.layers)

    def forward(self, states: list[torch.Tensor], labels: torch.Tensor) -> list[torch.Tensor]:
        return [trained_head_lm_loss(head, h, labels) for head, h in zip(self.heads, self.bank(states))]


def build_filter_learning(p: Plan, ds: dict, which: str) -> Recipe:
    """Stage 1: filters on the frozen ``which`` model learn to predict the next token at every tap,
    through the teacher's frozen head or through a head of their own (``distill.filter_head``)."""
    cfg = p.cfg
    if which == "teacher":
        layers, conf, load = p.teacher_layers, p.teacher_config, functools.partial(load_teacher, cfg)
    else:
        layers, conf, load = p.student_layers, p.student_config, functools.partial(load_student, p)
    bank = FilterBank(cfg.distill.filter, hidden_size(conf), p.filter_dim, layers, seed=cfg.train.seed,
                      model=p.models[which])
    bank = bank.to(compute_dtype(ds))  # initialised in fp32 (the same draws in any precision), trained in the run's
    head = TaskHead(cfg.teacher.path, cfg.teacher.trust_remote_code, compute_dtype(ds), distributed.device(),
                    p.manifest["vocab_size"])
    trainable = cfg.distill.filter_head == "trainable"
    engine = build_trained_engine(cfg, FiltersWithHeads(bank, head) if trainable else bank, ds, p.total_steps)
    if which == "student" and cfg.teacher.placement == "pipeline":  # a pipeline is for the teacher's size
        cfg = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, placement="zero3"))
    frozen = build_frozen(cfg, load, layers, None, False, ds, p.document_eos)
    n_filter = sum(p_.numel() for p_ in bank.parameters() if p_.ndim >= 2)
    head_mm = hidden_size(p.teacher_config) * vocab_size(p.teacher_config)
    flops = (flops_per_token(matmul_parameters(meta_model(conf)), conf, cfg.data.seq_len, False)
             + 6 * n_filter + (8 if trainable else 4) * head_mm * len(layers))  # head: forward + backward(s)

    def terms(input_ids, labels):
        taps, labels = [h.to(engine.device) for h in frozen(input_ids).taps], labels.to(engine.device)
        per_tap = engine(taps, labels) if trainable else tap_lm_losses(head, engine(taps), labels)
        out = {f"tap_lm/L{layer}": v for layer, v in zip(layers, per_tap)}
        out["loss"] = torch.stack(per_tap).mean()
        return out

    loss = lambda batch: terms(batch.input_ids, batch.labels)
    eval_loss = lambda input_ids, labels: terms(input_ids, labels)["loss"]
    return Recipe(f"filters-{which}", engine, frozen, loss, eval_loss, flops, bank)
