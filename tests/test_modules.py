"""One training step of each train module in this process, no launch: a world of one rank, the module built
by ``build_recipe`` around a real DeepSpeed ZeRO-3 engine, and the trainer's own ``train_step``. TED, KD,
LWD, LM (``DistillModule``) and stage 1 (``FilterModule``): the step's terms are the module's, its loss is
the module's loss at the weights it started from (its LM term the module's validation loss), and the step
lowers that loss on its batch."""

from __future__ import annotations

import os

import pytest
import torch

from harness.tiny import base_config
from ted_ds.plan import Job

TAPS = ("tap_lm/L2", "tap_lm/L4")  # stage 1 on the teacher: its layers 2 and 4 (teacher_every 2)


@pytest.fixture(scope="module")
def one_rank():
    """A process group of one rank in this process (gloo), for every test of the module; the environment,
    ted-ds's record of a started group and the torch threads are restored after."""
    from ted_ds import distributed

    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(distributed.free_port())}.items():
            mp.setenv(key, value)
        mp.setattr(distributed, "_STARTED", False)
        before = dict(os.environ)
        distributed.init(3)
        for key in set(os.environ) - set(before):  # what DeepSpeed's init adds goes when the module ends
            mp.setenv(key, os.environ[key])
        yield
        distributed.shutdown()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def banks(tiny, tmp_path_factory) -> dict:
    """Random stage-1 banks of the tiny teacher and its 2-block student, as a TED run checks them."""
    from harness.tiny import write_config
    from ted_ds.config import load_run_config
    from ted_ds.filters import FilterBank, save_filter_bank
    from ted_ds.plan import expected_bank, plan

    root = tmp_path_factory.mktemp("banks")
    cfg = write_config(str(root / "stage1.yaml"), **base_config(tiny["llama_data"], tiny["llama_teacher"],
                                                                  str(root / "out")))
    out = {}
    for side in ("teacher", "student"):
        m = expected_bank(plan(load_run_config(cfg), Job.learning_filters_of(side)), side)
        bank = FilterBank(m["kind"], m["in_dim"], m["out_dim"], m["layers"], seed=1, model=m["model"])
        out[f"{side}.filters"] = str(root / side)
        save_filter_bank(bank.state_dict(), bank.meta(), out[f"{side}.filters"])
    return out


def one_step(tiny, out_dir: str, job: Job, **over) -> tuple[dict, float, float, float]:
    """(the step's terms, the module's loss on the step's batch before it, after it, its eval loss before it)
    of one trainer step."""
    from harness.tiny import write_config
    from ted_ds.config import load_run_config
    from ted_ds.recipes import build_recipe
    from ted_ds.run import setup
    from ted_ds.trainer import train_step, training_data

    # one micro-batch of 2 windows; a step small enough that Adam's first (sign-like) step lowers the loss
    over = {"train.global_batch_size": 2, "train.steps": 1, "optim.lr": 1e-4, "optim.min_lr": 1e-5, **over}
    config = write_config(os.path.join(out_dir, "run.yaml"),
                          **base_config(tiny["llama_data"], tiny["llama_teacher"], out_dir, **over))
    p, ds = setup(load_run_config(config), job)
    module = build_recipe(p, ds, job)
    batch = training_data(p).next_batch()
    loss_now = lambda: module.loss(batch[0], 0)["loss"].item()
    with torch.no_grad():
        before = loss_now()
        evaluated = module.eval_loss(batch[0].input_ids, batch[0].labels).item()
    terms, skipped = train_step(module, batch, 1)
    assert not skipped
    with torch.no_grad():
        after = loss_now()
    return {k: v.item() for k, v in terms.items()}, before, after, evaluated


@pytest.mark.parametrize("method, terms", [
    ("ted", {"lm", "kd", "layer"}),
    ("kd", {"lm", "kd"}),
    ("lwd", {"lm", "kd", "layer"}),
    ("lm", {"lm"}),
])
def test_one_step_of_each_distill_module(one_rank, tiny, banks, tmp_path, method, terms):
    over = {"distill.method": method, **(banks if method == "ted" else {})}
    got, before, after, evaluated = one_step(tiny, str(tmp_path), Job.DISTILL, **over)
    assert set(got) == terms | {"loss"}
    assert got["loss"] == pytest.approx(before, rel=1e-6)  # the step trained on the module's own loss
    assert got["lm"] == pytest.approx(evaluated, rel=1e-6)  # whose LM term is the validation loss's
    assert after < before, (method, before, after)


def test_one_step_of_stage_1(one_rank, tiny, tmp_path):
    got, before, after, evaluated = one_step(tiny, str(tmp_path), Job.FILTERS_TEACHER)
    assert set(got) == {*TAPS, "loss"}
    assert got["loss"] == pytest.approx(before, rel=1e-6) == evaluated and got["loss"] == pytest.approx(
        (got[TAPS[0]] + got[TAPS[1]]) / 2, rel=1e-6)
    assert after < before, (before, after)
