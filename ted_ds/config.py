"""The one typed run configuration: dataclasses loaded from YAML, with dotted CLI overrides.

A run file looks like ``ted_ds/configs/demo.yaml``; any field can be overridden on the
command line as ``section.field=value`` (the value is parsed as YAML).  Unknown keys, wrong
types and impossible values are errors before any process group starts.  Batch size,
accumulation, clipping and learning rate live here; the DeepSpeed JSON is filled from them
(``"auto"``) or checked against them (see ``ted_ds.engine.resolve_ds_config``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Literal

import yaml

from ted_ds.errors import ConfigError

# The fixed choices of string fields: the loader accepts exactly a Literal's values (see _coerce).
Method = Literal["ted", "lwd", "kd", "lm"]
Placement = Literal["replicated", "zero3", "pipeline"]
LayerLoss = Literal["mse", "normalized_mse", "cosine"]
MapInit = Literal["normal", "identity"]
FilterKind = Literal["linear", "mlp"]
FilterHead = Literal["teacher", "trainable"]
Schedule = Literal["cosine", "wsd", "constant"]
WeightSchedule = Literal["constant", "wsd", "linear"]
LogitsDtype = Literal["fp32", "bf16", "fp16"]
Divergence = Literal["forward_kl", "reverse_kl", "jsd", "skew_kl"]
TopkForm = Literal["tail", "renormalized"]
CrossTokenizerLoss = Literal["chunk_likelihood", "overlap_kl"]
LogitsSampling = Literal["topk", "sampled"]
AttnImplementation = Literal["eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention"]


def _at_least_one(section: str, values: dict) -> None:
    """Counts and sizes of ``section`` that must be ≥ 1."""
    for name, value in values.items():
        if value < 1:
            raise ConfigError(f"{section}.{name} must be ≥ 1, got {value}")


@dataclass
class TeacherConfig:
    path: str | None = None
    """HF directory of the frozen teacher (weights, config, tokenizer), or a hub id (``org/name``)
    found in the local Hugging Face cache (HF_HOME / HF_HUB_CACHE; nothing is downloaded). Unused by
    ``method: lm``."""
    revision: str | None = None
    """With a hub id: the branch, tag or commit of the cached snapshot (default: main)."""
    placement: Placement = "replicated"
    """replicated: a full copy per rank; zero3: parameters sharded over all ranks (ZeRO-3 inference);
    pipeline: layers split over ``pipeline_stages`` ranks of each pipeline group."""
    pipeline_stages: int = 2
    """P, the number of pipeline stages (placement: pipeline). World size must be a multiple of P."""
    pipeline_layers: list[int] | None = None
    """Explicit stage boundaries: number of decoder layers on each stage (sums to the layer count).
    Default: balanced by forward FLOPs (the output head on the last stage; the embedding, a lookup, on none)."""
    pipeline_chunks: int = 1
    """Each micro-batch of the group is cut into this many chunks to fill the pipeline."""
    logits_dtype: LogitsDtype = "fp32"
    """fp32 | bf16 | fp16: the teacher's logits are rounded to this precision under every placement (what a
    pipeline teacher sends, what ``ted-ds cache-teacher`` stores: fp16 or bf16), so a run reading a cache
    sees the numbers the same run with the teacher online sees (ted_ds.teacher.teacher_logits)."""
    logits_topk: int = 0
    """> 0: the teacher gives only its top-k logits per token and KD is computed on that support."""
    logits_topk_form: TopkForm = "tail"
    """How KD reads the top-k (ted_ds/losses.py): tail (default) — the teacher's softened top-k plus one bucket
    for the rest of its mass, the student's likewise, D over k + 1 classes (the teacher also sends, and the
    cache stores, its tail logit at distill.temperature); renormalized — the teacher renormalised on its
    top-k, the old form, much worse at T > 1 (BENCHMARKS.md, "KD with the teacher's top-k")."""
    logits_top_p: float | None = None
    """In (0, 1], with logits_topk as the cap: per token only the smallest set of the teacher's top ids whose
    softened probability (at distill.temperature) reaches p, at most logits_topk of them; the rest of the
    top-k is dropped (−inf) and, in the tail form, joins the tail bucket. The cache then stores only the kept
    entries (ted_ds/cache/format.py)."""
    logits_sampling: LogitsSampling = "topk"
    """topk: the teacher's logits as logits_topk says (all of them at 0); sampled: logits_samples draws per
    position from the teacher's softened distribution (seeded by train.seed and the window), kept as unique
    ids with their counts, and KD is their unbiased estimate of forward KL (ted_ds/losses.py)."""
    logits_samples: int = 64
    """N, the draws per position of logits_sampling: sampled."""
    cache: str | None = None
    """A ``ted-ds cache-teacher`` directory: KD (and TED's logit term) reads the teacher's top-k logits from it;
    a logits-only method (kd) then never loads the teacher, ted/lwd still run it for its taps. The cache must
    match the run (teacher weights, tokenizer, data, seq_len, document attention, value dtype, k ≥ logits_topk):
    checked before any process group starts."""
    filters: str | None = None
    """Teacher filter bank from stage 1 (``learn-filters --model teacher``). Required by ``ted``."""
    attn_implementation: AttnImplementation | None = None
    """The teacher's attention kernel under every placement (None: what its config.json says, else transformers'
    default, sdpa): eager | sdpa | flash_attention_2 | flash_attention_3 | flex_attention. One the installed
    stack or the model cannot run is refused before any process group starts."""
    tokenizer: str | None = None
    """With ``distill.cross_tokenizer``: the teacher's tokenizer directory (default: the one in teacher.path)."""
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        _at_least_one("teacher", {"pipeline_stages": self.pipeline_stages, "pipeline_chunks": self.pipeline_chunks})
        if self.logits_topk < 0:
            raise ConfigError(f"teacher.logits_topk must be ≥ 0 (0: every logit), got {self.logits_topk}")
        if self.logits_topk_form != "tail" and self.logits_topk < 1:
            raise ConfigError(f"teacher.logits_topk_form {self.logits_topk_form} is a form of top-k KD: set "
                              "teacher.logits_topk, or drop the form")
        if self.cache and self.logits_topk < 1 and self.logits_sampling != "sampled":
            raise ConfigError("teacher.cache holds the teacher's top-k logits or samples: set teacher.logits_topk (at "
                              "most the cache's k), or teacher.logits_sampling: sampled")
        _check_logits_cut(self)


def _check_logits_cut(t: TeacherConfig) -> None:
    """top-p needs its top-k cap; sampling replaces top-k and top-p."""
    if t.logits_top_p is not None and not 0 < t.logits_top_p <= 1:
        raise ConfigError(f"teacher.logits_top_p must be in (0, 1], got {t.logits_top_p:g}")
    if t.logits_top_p is not None and t.logits_topk < 1:
        raise ConfigError("teacher.logits_top_p keeps at most teacher.logits_topk entries per token: set "
                          "teacher.logits_topk as its cap (e.g. 100)")
    if t.logits_samples < 1:
        raise ConfigError(f"teacher.logits_samples must be ≥ 1, got {t.logits_samples}")
    if t.logits_sampling == "sampled" and (t.logits_topk or t.logits_top_p is not None):
        raise ConfigError("teacher.logits_sampling: sampled draws from every logit: drop teacher.logits_topk and "
                          "teacher.logits_top_p")


@dataclass
class StudentConfig:
    path: str | None = None
    """HF directory (or cached hub id, as teacher.path) to start from (continual pre-training)."""
    revision: str | None = None
    """With a hub id: the branch, tag or commit of the cached snapshot (default: main)."""
    config: str | None = None
    """HF config (directory or config.json) for a randomly initialised student."""
    init_from_teacher: list[int] | None = None
    """0-based teacher layers to copy, in order, into a fresh student (embeddings, final norm and
    head are copied too). The usual way to start a small student well."""
    filters: str | None = None
    """Student filter bank from stage 1 (``learn-filters --model student``). Required by ``ted``."""
    attn_implementation: AttnImplementation | None = None
    """The student's attention kernel, as ``teacher.attn_implementation`` (flex_attention trains on GPUs only)."""
    activation_checkpointing: bool = False
    trust_remote_code: bool = False


@dataclass
class SourceConfig:
    name: str = ""
    """Names the source in metrics (``eval/<name>/loss``, ``data/<name>/samples``) and in the data state."""
    path: str = ""
    """A ``ted-prep build`` output directory."""
    weight: float = 1.0
    """Share of the training samples, relative to the other sources' weights."""


@dataclass
class DataConfig:
    path: str = ""
    """A ``ted-prep build`` output directory: shorthand for one source (give this or ``sources``)."""
    sources: list[SourceConfig] | None = None
    """Several builds blended by weight: ``[{name, path, weight}, …]``, all with one tokenizer."""
    seq_len: int = 256
    eval_samples: int = 64
    """Validation windows (per source) used for the perplexity printed every ``train.eval_interval`` steps."""
    document_attention: bool = False
    """Packed documents stay apart: position ids restart after every EOS (and at the window's start)
    and no token attends across a document boundary — in the student and the teacher, in training,
    stage 1 and evaluation. Targets are unchanged (the token after an EOS is predicted from the EOS).
    Costs a dense (B, 1, T, T) mask under sdpa/eager; see ted_ds.documents."""

    def __post_init__(self) -> None:
        _at_least_one("data", {"seq_len": self.seq_len})
        _check_sources(self)

    @property
    def blend(self) -> list[SourceConfig]:
        """The sources to train on: ``sources``, or ``path`` as one source named "data"."""
        return self.sources if self.sources is not None else [SourceConfig("data", self.path, 1.0)]


@dataclass
class DistillConfig:
    method: Method = "ted"
    """ted: filtered layer targets (two stages); lwd: raw teacher states, trainable student projection,
    no stage 1; kd: logits only (β = 0); lm: plain language modelling, no teacher at all."""
    alpha: float = 1.0
    """Weight of T²·KL(teacher ‖ student) on the temperature-softened next-token distributions."""
    beta: float = 1.0
    """Weight of the mean layer loss over taps (ted, lwd)."""
    temperature: float = 2.0
    alpha_schedule: WeightSchedule = "constant"
    """α over the run (ted_ds.optim.multiplier, the LR schedule's code): constant | wsd (after
    ``weight_warmup_steps`` from 0, stay at ``alpha``, then straight to ``alpha_final`` over the last
    ``weight_decay_fraction`` of the run) | linear (straight from ``alpha`` to ``alpha_final`` at the last step).
    Logged each step as ``weight/alpha``; a pure function of the step, so a resumed run continues it exactly."""
    alpha_final: float = 0.0
    """α at the last step under a wsd or linear ``alpha_schedule`` (above ``alpha``: a rise)."""
    beta_schedule: WeightSchedule = "constant"
    """β over the run, as ``alpha_schedule``."""
    beta_final: float = 0.0
    """β at the last step under a wsd or linear ``beta_schedule``."""
    weight_warmup_steps: int = 0
    """Steps over which scheduled weights (wsd, linear) rise from 0 to ``alpha`` / ``beta``."""
    weight_decay_fraction: float = 0.1
    """wsd weight schedules: the share of the run spent going to ``alpha_final`` / ``beta_final``."""
    teacher_every: int | None = None
    """k_t: tap the teacher after every k_t-th layer (layers k_t, 2k_t, …, the last)."""
    student_every: int | None = None
    """k_s: likewise for the student; both must give the same number of taps."""
    pairs: list[list[int]] | None = None
    """Explicit [[teacher_layer, student_layer], …] taps, 1-based (layer L = output of block L)."""
    filter: FilterKind = "linear"
    """linear: Linear(d_model → d_filter); mlp: Linear → GELU → Linear."""
    filter_dim: int | None = None
    """d_filter; defaults to the teacher's hidden size so the teacher's head can read filtered states."""
    filter_head: FilterHead = "teacher"
    """Stage 1 reads each filtered state as next-token logits through — teacher: the teacher's frozen final
    norm + unembedding, one head shared by every tap of both models (a tuned-lens-like probe: the filters
    must land in the teacher's own output coordinates; the default); trainable: a head per tap,
    initialised from that same norm + unembedding, trained with its filter and discarded after (as the
    official TED code trains a task head per filter). Stage 2 is the same either way."""
    divergence: Divergence = "forward_kl"
    """What KD minimises between the teacher's p and the student's q (both softened by the temperature; on
    the teacher's top-k with teacher.logits_topk): forward_kl KL(p ‖ q) (Hinton's KD; the default) |
    reverse_kl KL(q ‖ p) (mode-seeking, as MiniLLM) | jsd a·KL(p ‖ m) + (1 − a)·KL(q ‖ m) (GKD's generalised
    JSD) | skew_kl KL(p ‖ m) (DistiLLM), with m = a·p + (1 − a)·q and a = ``divergence_mix``. Formulas,
    gradients and the top-k form: ted_ds/losses.py."""
    divergence_mix: float = 0.5
    """a: the teacher's share of the mixture m that jsd (0 < a < 1; 0.5 is the symmetric JSD) and skew_kl
    (0 ≤ a < 1; 0 is forward KL, DistiLLM used 0.1) compare with; unused by forward_kl and reverse_kl."""
    cross_tokenizer: CrossTokenizerLoss | None = None
    """The teacher has a tokenizer of its own (teacher.tokenizer): it reads each student window's text in its
    own tokens, and in place of KD the student matches it on the text chunks both tokenizations share
    (ted_ds/crosstok.py, ted_ds/losses.py) — chunk_likelihood: each chunk's likelihood softened by distill.temperature,
    ALM's binary KL | overlap_kl: distill.divergence on the tokens both vocabularies spell alike,
    where a chunk is one token on both sides; method ted adds its layer loss on states mean-pooled over those
    chunks. Methods kd and ted, with a replicated, ZeRO-3 or pipeline teacher."""
    lwd_map_init: MapInit = "normal"
    """lwd: how its student map into the teacher's hidden space starts — normal: N(0, 0.02), as a fresh
    layer | identity: the identity (cut or zero-padded when the sizes differ; linear filter only), so the
    layer loss starts from the student's own states, as a student initialised from teacher blocks has them."""
    layer_loss: LayerLoss = "normalized_mse"
    """mse (the paper) | normalized_mse (MSE ÷ variance of the teacher target, per tap; default, so one β
    works across model pairs) | cosine (1 − cosine similarity per token)."""
    filters_out: str | None = None
    """learn-filters: where to write the bank (default ``<train.out_dir>/filters-<model>``)."""


    def __post_init__(self) -> None:
        if min(self.alpha, self.beta, self.temperature) < 0 or self.temperature == 0:
            raise ConfigError("distill.alpha and distill.beta must be ≥ 0 and distill.temperature > 0")
        _check_weight_schedules(self)
        if self.pairs is not None and (self.teacher_every or self.student_every):
            raise ConfigError("give distill.pairs or distill.teacher_every/student_every, not both")
        if self.lwd_map_init == "identity" and (self.method != "lwd" or self.filter != "linear"):
            raise ConfigError("distill.lwd_map_init=identity is for method lwd with the linear filter, got method "
                              f"{self.method} with filter {self.filter}")
        a = self.divergence_mix
        if self.divergence == "jsd" and not 0 < a < 1:
            raise ConfigError(f"distill.divergence_mix must be in (0, 1) for jsd (at 0 or 1 the mixture is q or p "
                              f"and the loss 0), got {a:g}")
        if self.divergence == "skew_kl" and not 0 <= a < 1:
            raise ConfigError(f"distill.divergence_mix must be in [0, 1) for skew_kl (at 1 the mixture is p and the "
                              f"loss 0), got {a:g}")


def _check_weight_schedules(d: DistillConfig) -> None:
    """A scheduled α or β runs from its value to a final one ≥ 0, over a sensible warmup and decay."""
    for w in ("alpha", "beta"):
        peak, schedule, final = getattr(d, w), getattr(d, f"{w}_schedule"), getattr(d, f"{w}_final")
        if schedule != "constant" and (peak <= 0 or final < 0):
            raise ConfigError(f"distill.{w}_schedule {schedule} runs from distill.{w} > 0 to distill.{w}_final ≥ 0; "
                              f"got {w} {peak:g}, {w}_final {final:g}")
    unused = [w for w, methods in (("alpha", ("lm",)), ("beta", ("kd", "lm")))
              if d.method in methods and getattr(d, f"{w}_schedule") != "constant"]
    if unused:
        raise ConfigError(f"distill.{unused[0]}_schedule: method {d.method} has no {unused[0]} term to schedule")
    if d.weight_warmup_steps < 0 or not 0 < d.weight_decay_fraction <= 1:
        raise ConfigError(f"need distill.weight_warmup_steps ≥ 0 and distill.weight_decay_fraction in (0, 1]; got "
                          f"{d.weight_warmup_steps} and {d.weight_decay_fraction:g}")


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 100
    warmup_start_lr: float = 0.0
    """LR the warmup starts from; a continual run re-warms from its predecessor's final LR."""
    schedule: Schedule = "cosine"
    """cosine (warmup, then cosine decay to min_lr at the last step) | wsd (warmup, stable at lr, linear
    decay to min_lr over the last ``decay_fraction`` of the run) | constant (after warmup)."""
    decay_fraction: float = 0.1
    """wsd: the share of the run spent decaying (MiniCPM and Hägele et al. 2024 use 10–20 %)."""
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Global-norm gradient clipping; 0 turns it off."""

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr or self.warmup_steps < 0:
            raise ConfigError("need optim.lr > 0, 0 ≤ optim.min_lr ≤ optim.lr and optim.warmup_steps ≥ 0")
        if not 0 <= self.warmup_start_lr <= self.lr:
            raise ConfigError(f"optim.warmup_start_lr must be in [0, optim.lr = {self.lr:g}], got "
                              f"{self.warmup_start_lr:g}")
        if not 0 < self.decay_fraction <= 1:
            raise ConfigError(f"optim.decay_fraction must be in (0, 1], got {self.decay_fraction:g}")
        if len(self.betas) != 2:
            raise ConfigError("optim.betas must be two numbers")


@dataclass
class TrainConfig:
    out_dir: str = "runs/ted"
    deepspeed_config: str = "ds_configs/zero3_cpu.json"
    """A DeepSpeed JSON from ds_configs/ (or your own); "auto" values are filled from this file."""
    micro_batch_size: int = 4
    global_batch_size: int = 32
    """Samples per optimizer step over all ranks = micro × accumulation × data-parallel ranks."""
    steps: int | None = None
    tokens: int | None = None
    """Alternative to ``steps``: train for this many tokens (rounded up to whole steps)."""
    seed: int = 1234
    log_interval: int = 10
    eval_interval: int = 100
    eval_steps: list[int] = field(default_factory=list)
    """Steps evaluated besides every ``eval_interval``-th and the last, e.g. [40, 100] for a learning
    curve at chosen points (with a large ``eval_interval``)."""
    save_interval: int = 500
    keep_last: int = 2
    """Checkpoints kept on disk (the newest K)."""
    init_from: str | None = None
    """Start a NEW run from another run's student weights: an HF directory, or a checkpoint (a run's
    out_dir, its checkpoints/<recipe> directory or one tag directory). Optimizer, schedule and data
    position start fresh — unlike resume, which continues a run exactly. Replaces student.path /
    config / init_from_teacher."""
    timeout_minutes: float = 10.0
    """Every collective fails with a clear error after this long instead of hanging."""
    peak_tflops: float | None = None
    """Per-device peak used for MFU; default: the datasheet's dense peak of the GPU model in the run's
    dtype (ted_ds.metrics), on a CPU measured by a matmul; a GPU the table does not know: no MFU."""
    progress: bool = True
    compile_blocks: bool = False
    """torch.compile every decoder block of the student and of the frozen teacher (every placement, and
    stage 1's frozen model); under ZeRO-3 each block's parameters are then gathered by one hook.  The same
    numbers within rounding.  Needs Triton on a GPU and a C++ compiler on a CPU (checked at start-up)."""
    max_bad_steps: int = 5
    """A step whose loss is NaN/inf on any rank is skipped (no optimizer update) and counted as
    ``bad_steps``; this many in a row stop the run with an error, the last good checkpoint kept."""
    inject_nan_steps: list[int] | None = None
    """Test hook, not for real runs: these 1-based steps' loss reads NaN on rank 0 only (gradients
    stay finite), so a test sees the trainer itself, agreed over ranks, skip the step."""

    def __post_init__(self) -> None:
        _at_least_one("train", {key: getattr(self, key) for key in (
            "micro_batch_size", "global_batch_size", "log_interval", "eval_interval", "save_interval", "keep_last",
            "max_bad_steps")})
        if any(not isinstance(k, int) or k < 1 for k in self.eval_steps):
            raise ConfigError(f"train.eval_steps must be steps ≥ 1, got {self.eval_steps}")
        if self.steps is not None and self.tokens is not None:
            raise ConfigError("set only one of train.steps and train.tokens")
        if (self.steps or 1) < 1 or (self.tokens or 1) < 1:
            raise ConfigError("train.steps / train.tokens must be ≥ 1")


@dataclass
class RunConfig:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        """What spans sections; each section checks its own fields when it is built."""
        d, t, tr = self.distill, self.teacher, self.train
        if tr.steps is None and tr.tokens is None:
            raise ConfigError("set train.steps or train.tokens")
        if not self.data.path and self.data.sources is None:
            raise ConfigError("data.path is required (a ted-prep build directory), or data.sources")
        if sum(x is not None for x in (self.student.path, self.student.config, self.student.init_from_teacher,
                                       tr.init_from)) != 1:
            raise ConfigError("give exactly one of student.path, student.config, student.init_from_teacher and "
                              "train.init_from")
        if self.uses_teacher and not t.path:
            raise ConfigError(f"method {d.method} needs teacher.path")
        if t.cache and not self.uses_teacher:
            raise ConfigError(f"method {d.method} uses no teacher: remove teacher.cache")
        if self.student.init_from_teacher is not None and not t.path:
            raise ConfigError("student.init_from_teacher needs teacher.path")
        _check_cross_tokenizer(self)
        if t.logits_sampling == "sampled" and self.uses_logits and d.divergence != "forward_kl":
            raise ConfigError(f"teacher.logits_sampling: sampled estimates forward KL only (unbiased by its draws); "
                              f"distill.divergence {d.divergence} needs the teacher's logits: use forward_kl or top-k")
        if t.placement == "pipeline" and t.pipeline_chunks > tr.micro_batch_size:
            raise ConfigError(f"teacher.pipeline_chunks {t.pipeline_chunks} exceeds train.micro_batch_size "
                              f"{tr.micro_batch_size}: a chunk would hold no sequence")

    @property
    def tokens_per_step(self) -> int:
        return self.train.global_batch_size * self.data.seq_len

    @property
    def total_steps(self) -> int:
        """The run's optimizer steps: ``train.steps``, or ``train.tokens`` rounded up to whole steps."""
        return self.train.steps or math.ceil(self.train.tokens / self.tokens_per_step)

    @property
    def uses_teacher(self) -> bool:
        return self.distill.method != "lm"

    @property
    def uses_layers(self) -> bool:
        return self.distill.method in ("ted", "lwd") and self.distill.beta > 0

    @property
    def uses_logits(self) -> bool:
        return self.distill.method != "lm" and self.distill.alpha > 0

    @property
    def logits_from_cache(self) -> bool:
        return self.uses_logits and self.teacher.cache is not None

    @property
    def tail_temperature(self) -> float | None:
        """The temperature of the teacher's tail logit (top-k KD in the tail form); None without one."""
        t = self.teacher
        return self.distill.temperature if t.logits_topk and t.logits_topk_form == "tail" else None

    @property
    def runs_teacher(self) -> bool:
        """The teacher's forward runs during training: for its taps, or for logits that no cache holds."""
        return self.uses_teacher and (self.uses_layers or not self.logits_from_cache)


def _check_cross_tokenizer(cfg: RunConfig) -> None:
    """distill.cross_tokenizer runs method kd or ted with a replicated, ZeRO-3 or pipeline teacher reading full
    logits; what else would need the teacher's tokens (its cache, top-k, LWD's raw states, document masks) is not
    built."""
    t = cfg.teacher
    if cfg.distill.cross_tokenizer is None:
        if t.tokenizer is not None:
            raise ConfigError("teacher.tokenizer is for distill.cross_tokenizer: set it, or drop teacher.tokenizer")
        return
    unsupported = [("distill.method", cfg.distill.method, cfg.distill.method not in ("kd", "ted")),
                   ("teacher.cache", t.cache, t.cache is not None),
                   ("teacher.logits_topk", t.logits_topk, t.logits_topk > 0),
                   ("teacher.logits_sampling", t.logits_sampling, t.logits_sampling != "topk"),
                   ("data.document_attention", cfg.data.document_attention, cfg.data.document_attention),
                   ("student.init_from_teacher", cfg.student.init_from_teacher, cfg.student.init_from_teacher)]
    refused = [(key, value) for key, value, bad in unsupported if bad]
    if refused:
        key, value = refused[0]
        raise ConfigError(f"distill.cross_tokenizer works with distill.method kd or ted, without teacher.cache, "
                          f"logits_topk, logits_sampling, data.document_attention or student.init_from_teacher, so "
                          f"far; this run has {key} {value}")
    if cfg.distill.cross_tokenizer == "chunk_likelihood" and cfg.distill.divergence != "forward_kl":
        raise ConfigError(f"distill.divergence {cfg.distill.divergence} is for overlap_kl: chunk_likelihood matches "
                          "each chunk's likelihood by ALM's binary KL; drop distill.divergence or use overlap_kl")


def _check_sources(data: DataConfig) -> None:
    """At most one of data.path and data.sources; sources named, located and weighted sensibly."""
    if data.path and data.sources is not None:
        raise ConfigError("give data.path (one source) or data.sources, not both")
    if data.sources is None:
        return
    if not data.sources:
        raise ConfigError("data.sources is empty")
    seen = set()
    for i, src in enumerate(data.sources):
        for key in ("name", "path"):
            if not getattr(src, key):
                raise ConfigError(f"data.sources[{i}]: {key} is required")
        if src.name in seen:
            raise ConfigError(f"data.sources: duplicate name {src.name!r}")
        seen.add(src.name)
        if not math.isfinite(src.weight) or src.weight < 0:
            raise ConfigError(f"data.sources[{i}] ({src.name}): weight must be a number ≥ 0, got {src.weight}")
    if not any(src.weight for src in data.sources):
        raise ConfigError("data.sources: all weights are 0")


def check_pipeline_world(stages: int, world: int) -> None:
    """A pipeline teacher's groups tile the ranks."""
    if world % stages:
        raise ConfigError(f"teacher.pipeline_stages {stages} must divide the number of ranks {world}")


def accumulation_steps(global_batch: int, micro_batch: int, ranks: int) -> int:
    """Micro-batches each data-parallel rank runs per optimizer step; one line (with a global batch
    that would split) when ``global_batch`` is not a multiple of ``micro_batch × ranks``."""
    unit = micro_batch * ranks
    if global_batch % unit:
        nearest = unit * max(1, round(global_batch / unit))
        raise ConfigError(f"train.global_batch_size {global_batch} is not a multiple of micro_batch_size "
                          f"{micro_batch} × {ranks} ranks; try global_batch_size={nearest}")
    return global_batch // unit


# ----------------------------------------------------------------------------- loading
def _coerce(value, hint, where: str):
    """Check a YAML value against a field's type hint (ints are accepted for floats; a ``Literal``
    field takes only its values, the one list of them)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where} must be one of {', '.join(args)}; got {value!r}")
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping")
        return _build(hint, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)] if args else value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads "3e-3" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool) and not (isinstance(value, hint) and not (hint is int and
                                                                                 isinstance(value, bool))):
        raise ConfigError(f"{where} must be {hint.__name__}, got {value!r}")
    return value


def _build(cls, data: dict, where: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown config key {prefix}{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def apply_override(data: dict, override: str) -> None:
    """``a.b=value`` sets ``data["a"]["b"]`` (value parsed as YAML)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.key=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {p} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: cannot parse value {raw!r} ({e})") from None


def load_run_config(path: str | None, overrides: list[str] = ()) -> RunConfig:
    data: dict = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        try:
            with open(path) as f:
                data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}{yaml_error_place(e)}: not valid YAML ({yaml_problem(e)})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    for o in overrides:
        apply_override(data, o)
    return _build(RunConfig, data)


def yaml_error_place(error: yaml.YAMLError) -> str:
    """``:LINE:COLUMN`` (1-based) where the YAML parser gave up, or nothing when it cannot say."""
    mark = getattr(error, "problem_mark", None)
    return f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""


def yaml_problem(error: yaml.YAMLError) -> str:
    """What the parser expected, and where the construct it was in began (an unclosed bracket's line)."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    context, mark = getattr(error, "context", None), getattr(error, "context_mark", None)
    return f"{problem}, {context} started on line {mark.line + 1}" if context and mark else problem


def data_config(data: dict) -> DataConfig:
    """The ``data`` section of a saved run (``to_dict``, in trainer_state.json) as the DataConfig it was."""
    return _build(DataConfig, data, "data")


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: RunConfig, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)


# What a resumed run may change: how it runs, logs, evaluates and saves, never what it trains (the
# models, data, objective, optimizer, schedule, length and seeds).  Every other key is refused on resume.
SAFE_TO_CHANGE = frozenset({
    "train.out_dir", "train.log_interval", "train.eval_interval", "train.eval_steps", "train.save_interval",
    "train.keep_last", "train.timeout_minutes", "train.peak_tflops", "train.progress", "train.compile_blocks",
    "train.max_bad_steps", "train.micro_batch_size", "data.eval_samples", "distill.filters_out",
    "teacher.placement", "teacher.pipeline_stages", "teacher.pipeline_layers", "teacher.pipeline_chunks",
    "teacher.attn_implementation", "teacher.trust_remote_code", "student.attn_implementation",
    "student.activation_checkpointing", "student.trust_remote_code",
    "train.inject_nan_steps",  # a test's fault, gone in the re-run that resumes past it
})


def flat_config(cfg: RunConfig) -> dict[str, object]:
    """``section.field`` → value (a list, e.g. ``data.sources``, stays one value)."""
    return {f"{section}.{key}": value for section, fields in to_dict(cfg).items() for key, value in fields.items()}


def config_changes(old: RunConfig, new: RunConfig) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """The keys whose values differ between a run's own config and a relaunch's, as ``key → (old, new)``,
    split into (refused: they change what is trained, allowed: ``SAFE_TO_CHANGE``)."""
    before, after = flat_config(old), flat_config(new)
    changed = {key: (before[key], after[key]) for key in after if before.get(key) != after[key]}
    refused = {k: v for k, v in changed.items() if k not in SAFE_TO_CHANGE}
    return refused, {k: v for k, v in changed.items() if k in SAFE_TO_CHANGE}


def run_config_from_dict(data: dict) -> RunConfig:
    """A saved run config (``to_dict``, in trainer_state.json) as the RunConfig it was."""
    return _build(RunConfig, data)
