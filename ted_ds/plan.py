"""The plan of a run: every check of a config against the files it names, before any process group.

``plan`` reads configs, manifests and tokenizers from disk and checks that everything fits together
(shapes, taps, vocabularies, tokenizers, data sources, filter banks, the teacher cache, the step
budget); ``ted_ds.recipes`` turns the ``Plan`` into what trains.  A ``Job`` says what a command
trains.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field

import torch

from data_prep.tokenizer import TOKENIZER_FILES, load_tokenizer, vocab_fingerprint
from data_prep.verify import verify_dataset
from ted_ds.architectures import (
    check_attention,
    check_compile,
    hidden_size,
    load_hf_config,
    max_positions,
    meta_model,
    num_layers,
    teacher_blocks_config,
    vocab_size,
    with_attention,
)
from ted_ds.checkpoint import distill_recipe, holds_student, read_record, resolve_checkpoint
from ted_ds.config import DataConfig, RunConfig
from ted_ds.crosstok import CrossTokenizer, load_cross_tokenizer
from ted_ds.documents import check_document_attention, check_trainable_attention
from ted_ds.errors import ConfigError
from ted_ds.filters import check_filter_bank, model_record
from ted_ds.hub import with_local_models
from ted_ds.optim import check_schedule_lengths
from ted_ds.taps import tap_pairs
from ted_ds.weights import fingerprint


class Job(enum.Enum):
    """What a command trains: ``distill.method`` (TED stage 2 or a baseline), or TED stage 1's filters
    on the frozen teacher or student (``ted-ds learn-filters --model``)."""

    DISTILL = "distill"
    FILTERS_TEACHER = "filters-teacher"
    FILTERS_STUDENT = "filters-student"

    @classmethod
    def learning_filters_of(cls, model: str | None) -> Job:
        """The job of ``learn-filters --model <model>``; None: distill."""
        return {None: cls.DISTILL, "teacher": cls.FILTERS_TEACHER, "student": cls.FILTERS_STUDENT}[model]

    @property
    def filters_of(self) -> str | None:
        """The model ("teacher" | "student") whose stage-1 filters this job learns; None for distill."""
        return {Job.FILTERS_TEACHER: "teacher", Job.FILTERS_STUDENT: "student"}.get(self)


def recipe_name(method: str, job: Job) -> str:
    """The recipe (and ``checkpoints/`` directory) a job trains: ``distill-<method>`` or ``filters-<model>``."""
    return distill_recipe(method) if job is Job.DISTILL else job.value


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
    cross: CrossTokenizer | None = None  # distill.cross_tokenizer: both tokenizers, loaded and checked

    @property
    def teacher_layers(self) -> list[int]:
        return [t for t, _ in self.pairs]

    @property
    def student_layers(self) -> list[int]:
        return [s for _, s in self.pairs]


SPECIAL_ROLES = ("eos", "bos", "pad", "unk")


def check_tokenizer(model_dir: str, manifest: dict, what: str, data_dir: str) -> None:
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


def model_configs(cfg: RunConfig, needs_teacher: bool) -> tuple:
    """The HF configs the run builds its teacher (None without one) and student from, each with the run's
    attention kernel, checked to run here and to hold ``data.seq_len`` positions."""
    t, s = cfg.teacher, cfg.student
    teacher_file_config = load_hf_config(t.path, t.trust_remote_code) if t.path and needs_teacher else None
    if cfg.train.init_from:
        student_config = init_from_config(cfg.train.init_from, s.trust_remote_code)
    elif s.path:
        student_config = load_hf_config(s.path, s.trust_remote_code)
    elif s.config:
        student_config = load_hf_config(s.config, s.trust_remote_code)
    else:  # teacher blocks: from the teacher's own file config, not inheriting teacher.attn_implementation
        student_config = teacher_blocks_config(teacher_file_config, s.init_from_teacher)
    teacher_config = None if teacher_file_config is None else with_attention(teacher_file_config, t.attn_implementation)
    student_config = with_attention(student_config, s.attn_implementation)
    for what, conf in (("teacher", teacher_config), ("student", student_config)):
        if conf is None:
            continue
        check_attention(conf, what)
        limit = max_positions(conf)
        if limit is not None and cfg.data.seq_len > limit:
            raise ConfigError(f"data.seq_len {cfg.data.seq_len} exceeds the {what}'s {limit} positions")
    return teacher_config, student_config


def plan(cfg: RunConfig, job: Job = Job.DISTILL) -> Plan:
    """Validate a run of ``job`` against the files it names.  Every shard is checked against the
    manifest here, before any process group: a damaged one is named.  Hub ids in the config are
    replaced by the directories of the local HF cache first, once (``with_local_models``): the plan
    holds the config the run uses."""
    learning = job is not Job.DISTILL
    if learning and cfg.distill.cross_tokenizer:
        raise ConfigError(f"learn-filters --model {job.filters_of} reads one tokenizer, and this data is the "
                          "student's: learn each side's filters on its own tokens through its own head, with a config "
                          "without distill.cross_tokenizer (data built with that side's tokenizer, teacher.path that "
                          "model)")
    manifests = check_sources(cfg.data)
    manifest = manifests[0]
    needs_teacher = cfg.uses_teacher or cfg.student.init_from_teacher is not None or learning
    cfg = with_local_models(cfg, teacher=needs_teacher)  # hub ids → directories of the local HF cache
    t, s = cfg.teacher, cfg.student
    teacher_config, student_config = model_configs(cfg, needs_teacher)
    cross = load_cross_tokenizer(cfg, manifest, teacher_config) if cfg.distill.cross_tokenizer else None
    same_tokens_teacher = teacher_config if cross is None else None  # one across tokenizers reads its own ids
    vocab_line = check_vocabularies(manifest, {"teacher": (same_tokens_teacher, t.path),
                                               "student": (student_config, s.path or s.config or cfg.train.init_from)})
    hf_start = cfg.train.init_from if cfg.train.init_from and is_hf_dir(cfg.train.init_from) else s.path
    for what, path in (("teacher", t.path if same_tokens_teacher is not None else None), ("student", hf_start)):
        if path:
            check_tokenizer(path, manifest, what, cfg.data.blend[0].path)  # sources share one tokenizer
    uses_teacher_geometry = cfg.uses_teacher or learning
    if uses_teacher_geometry and teacher_config is None:
        raise ConfigError("this command needs teacher.path")
    pairs: list[tuple[int, int]] = []
    if cfg.uses_layers or learning:
        pairs = tap_pairs(cfg.distill, num_layers(teacher_config), num_layers(student_config))
    filter_dim = None
    if teacher_config is not None:
        filter_dim = cfg.distill.filter_dim or hidden_size(teacher_config)
        if learning and filter_dim != hidden_size(teacher_config):
            raise ConfigError(f"distill.filter_dim {filter_dim} must equal the teacher's hidden size "
                              f"{hidden_size(teacher_config)}: stage 1 reads filtered states with the teacher's head")
    total = cfg.total_steps
    check_schedule_lengths(cfg, total)
    document_eos = _document_eos(cfg, manifest, teacher_config, student_config)
    sides = [job.filters_of] if learning else ["teacher", "student"] if cfg.distill.method == "ted" else []
    if not learning:  # stage 1 trains filters only; the models run without gradients
        check_trainable_attention(meta_model(student_config), "student", on_cpu=not torch.cuda.is_available())
    if cfg.train.compile_blocks:
        check_compile(on_gpu=torch.cuda.is_available())
    p = Plan(cfg, teacher_config, student_config, pairs, filter_dim, manifest, total, manifests, document_eos,
             vocab_line, {side: learned_on(cfg, student_config, side) for side in sides},
             check_cache(cfg, manifest) if cfg.logits_from_cache else None, cross)
    if cfg.distill.method == "ted" and not learning:
        check_banks(p)
    return p


def learned_on(cfg: RunConfig, student_config, side: str) -> dict:
    """The model a filter bank of ``side`` is learned on, as the bank's metadata records it (model_record):
    a directory by the digest of its weights; a student built from a checkpoint, teacher blocks or at
    random by how it is built (what load_student builds it from)."""
    t, s = cfg.teacher, cfg.student
    start = t.path if side == "teacher" else cfg.train.init_from or s.path
    if start and is_hf_dir(start):
        return model_record(start)
    if start:  # a checkpoint: its record of the run and step is what names it
        ckpt_dir, tag = resolve_checkpoint(start, None)
        record = read_record(os.path.join(ckpt_dir, tag))
        return {"name": os.path.join(ckpt_dir, tag), "digest": _digest(dataclasses.asdict(record))}
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


def is_hf_dir(path: str) -> bool:
    """An HF model directory (its config.json), not a checkpoint."""
    return os.path.isfile(os.path.join(path, "config.json"))


def init_from_config(path: str, trust_remote_code: bool):
    """The student's HF config for ``train.init_from``: an HF directory's, or the one a checkpoint
    recorded (its trainer_state.json); one line if ``path`` is neither."""
    from transformers import AutoConfig

    if not os.path.exists(path):
        raise ConfigError(f"train.init_from: {path} does not exist (an HF directory or a run's checkpoint)")
    if is_hf_dir(path):
        return load_hf_config(path, trust_remote_code)
    ckpt_dir, tag = resolve_checkpoint(path, None)
    run = read_record(os.path.join(ckpt_dir, tag)).run
    if not run.get("student_config") or not holds_student(ckpt_dir):
        raise ConfigError(f"train.init_from: {ckpt_dir}/{tag} is not a distill checkpoint (no student in it)")
    return AutoConfig.for_model(**run["student_config"])
