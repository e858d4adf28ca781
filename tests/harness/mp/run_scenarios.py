"""Runs several training commands in ONE multi-rank launch and records what pytest checks.

    deepspeed --num_gpus 2 tests/harness/mp/run_scenarios.py --spec spec.json --out results.json

spec.json: [{"name": ..., "config": path, "job": "distill" (default)|"filters-teacher"|"filters-student",
"accelerator": "as-is"|"bf16"|"none", "build_only": bool, "cache_out": dir, "block_windows": n}, ...].
For each scenario the real command runs (``ted_ds.run.run_recipe``), with DeepSpeed's accelerator
reporting the half-precision support ``accelerator`` names; afterwards this script records whether the
frozen side (teacher and its filters, or the frozen student of stage 1) is bit-identical to what it
was built from, how many frozen parameters this rank stores, the devices and dtypes of what it holds,
and what a probe on the student saw during the training steps (see ``StudentProbe``).  A
``build_only`` scenario builds the command's models and records what they hold, or its error; a
``cache_out`` scenario runs ``ted-ds cache-teacher`` (``ted_ds.cache.build.build_cache``) into that directory.
A scenario that raises (alike on every rank) is recorded as ``{"raised": traceback}`` and the next one runs;
the records are written after every scenario (``tests/harness/scenarios.py`` reads them).
"""

import argparse
import json
import os
import sys
import traceback
from dataclasses import asdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # tests/

from ted_ds import (
    distributed,  # noqa: E402
    recipes,  # noqa: E402
    run,  # noqa: E402
)
from ted_ds.architectures import decoder_layers  # noqa: E402
from ted_ds.cache.build import build_cache  # noqa: E402
from ted_ds.cli import _quiet_libraries  # noqa: E402
from ted_ds.config import load_run_config  # noqa: E402
from ted_ds.export import gathered_state_dict  # noqa: E402
from ted_ds.filters import load_filter_bank  # noqa: E402
from ted_ds.models import load_student  # noqa: E402
from ted_ds.plan import Job, plan  # noqa: E402
from ted_ds.taps import TappedLM  # noqa: E402
from ted_ds.weights import (
    WeightReader,  # noqa: E402
    load_model,  # noqa: E402
)


class StudentProbe:
    """Watches the student during training forwards (grad enabled; evaluation is not counted): how many
    times the first sub-module of its first block runs per forward of the whole model (2 under
    activation checkpointing: the forward and its recomputation in the backward; transformers keeps
    the block's own hooks outside the checkpoint, so the probe sits inside it), the dtypes of that
    module's weights and output, whether it was in train mode (dropout live), and the share of the
    student's parameters whole as a training forward starts (ZeRO-3 persistence)."""

    def __init__(self, model):
        self.forwards, self.block_calls, self.resident = 0, 0, 0
        self.full = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        self.weights, self.activations, self.train_mode = set(), set(), set()
        model.register_forward_pre_hook(self._model_starts)
        model.register_forward_hook(self._model_ran)
        next(decoder_layers(model)[0].children()).register_forward_hook(self._block_ran)

    def _model_starts(self, module, _inputs):
        if torch.is_grad_enabled():  # ZeRO-3 gathers a block at the block: what is whole here stayed whole
            self.resident = max(self.resident, sum(p.data.numel() for p in module.parameters()))

    def _model_ran(self, _module, _inputs, _output):
        self.forwards += torch.is_grad_enabled()

    def _block_ran(self, module, _inputs, output):
        if torch.is_grad_enabled():
            self.block_calls += 1
            self.weights |= {str(p.dtype) for p in module.parameters()}
            self.activations.add(str((output[0] if isinstance(output, tuple) else output).dtype))
            self.train_mode.add(module.training)

    def record(self) -> dict:
        return {"block_calls_per_forward": self.block_calls / self.forwards, "weight_dtypes": sorted(self.weights),
                "resident_share": self.resident / self.full,
                "activation_dtypes": sorted(self.activations), "train_mode": sorted(self.train_mode)}


def probe_students(probes: list) -> None:
    """Every student the trainer builds from now on gets a ``StudentProbe``, appended to ``probes``."""
    build = recipes.build_distill

    def build_and_probe(p, ds):
        recipe = build(p, ds)
        probes.append(StudentProbe(recipe.trained_model.model))
        return recipe

    recipes.build_distill = build_and_probe


def frozen_source(cfg, job: Job):
    """The frozen model as built from disk: the teacher, or the student in stage 1 on the student side."""
    return load_student(plan(cfg, job)) if job is Job.FILTERS_STUDENT else load_model(cfg.teacher.path)


def frozen_matches_disk(recipe, cfg, job: Job) -> bool:
    if recipe.frozen.placement == "pipeline":
        return pipeline_matches_disk(recipe.frozen, cfg)
    frozen = recipe.frozen.frozen if recipe.frozen.placement == "replicated" else recipe.frozen.engine.module
    dtype = next(frozen.parameters()).dtype  # bf16 runs hold the teacher rounded to bf16
    state = gathered_state_dict(frozen)
    if distributed.rank() != 0:
        return True
    disk = frozen_source(cfg, job).state_dict()
    ok = all(torch.equal(state[f"model.{k}"], v.to(dtype).float()) for k, v in disk.items())
    if frozen.filters is not None:
        bank = load_filter_bank(cfg.teacher.filters, frozen.filters.meta(), "teacher.filters")
        ok &= all(torch.equal(state[f"filters.{k}"], v.to(dtype).float()) for k, v in bank.state_dict().items())
    return bool(ok)


def pipeline_matches_disk(pipe, cfg) -> bool:
    """Every materialised tensor of this rank's recipe (and its filters) equals the teacher on disk."""
    disk = load_model(cfg.teacher.path).state_dict()
    ok = all(torch.equal(v, disk[k]) for k, v in pipe.model.state_dict().items() if not v.is_meta and k in disk)
    if pipe.filters is not None:
        bank = load_filter_bank(cfg.teacher.filters, {"kind": cfg.distill.filter, "in_dim": pipe.layout.hidden_size,
                                                      "out_dim": pipe.layout.filter_dim,
                                                      "layers": list(pipe.layout.tap_layers)}, "t")
        ok &= all(torch.equal(a, b) for i, f in zip(pipe.local_taps, pipe.filters)
                  for a, b in zip(f.state_dict().values(), bank.filters[i].state_dict().values()))
    flag = torch.tensor([1.0 if ok else 0.0])
    return bool(distributed.all_reduce_sum(flag)[0] == distributed.world_size())


def held(module, parameters_only: bool = False) -> list[torch.Tensor]:
    """What this rank stores of ``module``: ZeRO-3 parameters by their partitions, the pipeline's
    meta-device stand-ins left out."""
    tensors = [*module.parameters(), *([] if parameters_only else module.buffers())]
    tensors = [getattr(t, "ds_tensor", None) if hasattr(t, "ds_tensor") else t for t in tensors]
    return [t for t in tensors if t is not None and not t.is_meta]


def frozen_modules(frozen) -> list:
    """The modules of a teacher placement (its model and filters)."""
    if frozen is None:
        return []
    if frozen.placement == "pipeline":
        return [frozen.model] + ([frozen.filters] if frozen.filters is not None else [])
    return [frozen.frozen if frozen.placement == "replicated" else frozen.engine.module]


def compiled_blocks(recipe) -> dict[str, int]:
    """How many decoder blocks of the trained student and of the frozen model run a torch.compile'd forward."""
    models = {}
    if isinstance(recipe.trained_model, TappedLM):  # stage 2 and the baselines (stage 1 trains filters only)
        models["trained"] = recipe.trained_model.model
    if recipe.frozen is not None:  # a pipeline stage's own model; the FrozenLM of the other placements
        f = recipe.frozen
        models["frozen"] = f.model if f.placement == "pipeline" else frozen_modules(f)[0].model
    return {side: sum(hasattr(b.forward, "_torchdynamo_orig_callable") for b in decoder_layers(m))
            for side, m in models.items()}


def held_by(recipe) -> dict[str, dict[str, list[str]]]:
    """Device types of every tensor this rank holds, and dtypes of its floating-point parameters, for the
    trained module and the frozen side."""
    sides = {"trained": [recipe.engine.module], "frozen": frozen_modules(recipe.frozen)}
    return {"devices": sorted({t.device.type for m in sum(sides.values(), []) for t in held(m)}),
            "dtypes": {side: sorted({str(t.dtype) for m in modules for t in held(m, True) if t.is_floating_point()})
                       for side, modules in sides.items()}}


def accelerator_reports(support: str) -> None:
    """Make DeepSpeed's accelerator report the given half-precision support, whatever this machine has:
    "as-is", "bf16" (no fp16: every AMD CPU, most Intel CPUs) or "none" (neither fp16 nor bf16)."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    for kind in ("fp16", "bf16"):
        attr = f"is_{kind}_supported"
        if support == "as-is":
            acc.__dict__.pop(attr, None)
        else:
            setattr(acc, attr, (lambda answer: lambda: answer)(kind in support))


def build_only(cfg, job: Job) -> dict:
    """A recipe built as the command builds it, not trained: what every rank holds, or the one-line error."""
    from ted_ds.errors import UserError

    try:
        p, ds = run.setup(cfg, job)
        return held_by(recipes.build_recipe(p, ds, job))
    except UserError as e:
        return {"error": str(e)}


def run_scenario(scenario: dict, probes: list) -> dict:
    """One scenario's record (see the module's docstring)."""
    cfg = load_run_config(scenario["config"], scenario.get("overrides", []))
    accelerator_reports(scenario.get("accelerator", "as-is"))
    job = Job(scenario.get("job", Job.DISTILL.value))
    if scenario.get("build_only"):
        return build_only(cfg, job)
    if scenario.get("cache_out"):
        return {"line": build_cache(cfg, scenario["cache_out"], None, scenario["block_windows"])}
    probed, read_before = len(probes), WeightReader.process_total
    recipe, _, result = run.run_recipe(cfg, job)
    record = {"result": {k: v for k, v in {**result.metrics, **asdict(result)}.items()
                         if isinstance(v, (int, float, str, bool))}}
    if len(probes) > probed:
        record["student"] = probes[-1].record()
    read = torch.tensor([float(WeightReader.process_total - read_before)])
    torch.distributed.all_reduce(read, op=torch.distributed.ReduceOp.MAX)
    record["elements_read_max"] = float(read[0])  # what the busiest rank read from weight files
    record.update(held_by(recipe))
    record["compiled_blocks"] = compiled_blocks(recipe)
    if recipe.frozen is not None:
        record["frozen_matches_disk"] = frozen_matches_disk(recipe, cfg, job)
        local = torch.tensor([float(recipe.frozen.local_parameters())])
        record["frozen_local_params_rank0"] = float(local[0])
        record["frozen_local_params_sum"] = float(distributed.all_reduce_sum(local)[0])
    return record


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spec", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int)
    args = parser.parse_args()
    _quiet_libraries()
    results, probes = {}, []
    probe_students(probes)
    for scenario in json.load(open(args.spec)):
        try:
            results[scenario["name"]] = run_scenario(scenario, probes)
        except Exception:  # every rank raises alike: record it, the next scenarios still run
            results[scenario["name"]] = {"raised": traceback.format_exc()[-4000:]}
        distributed.barrier()
        if distributed.rank() == 0:  # after every scenario: a launch that dies later keeps what ran
            with open(args.out, "w") as f:
                json.dump(results, f, indent=2)
    distributed.shutdown()
    distributed.leave(0)  # no C++ destructors at exit (see ted_ds.distributed.leave)


if __name__ == "__main__":
    main()
