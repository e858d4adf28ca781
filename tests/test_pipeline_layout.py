"""The teacher's split into pipeline stages: balanced by forward FLOPs, the input embedding (a lookup)
charged to no stage and the output head to the last."""

from __future__ import annotations

import itertools

import pytest
import torch._dynamo  # noqa: F401  building the meta model imports it, which sets TORCHINDUCTOR_CACHE_DIR
from transformers import LlamaConfig

from ted_ds.pipeline.layout import block_costs, stage_blocks

# the GPU check's ~3.6 B teacher: 28 blocks of ~100 M parameters, a 128k × 3072 embedding and head (~394 M each)
TEACHER = LlamaConfig(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                      num_attention_heads=24, num_key_value_heads=8, tie_word_embeddings=False)


def stage_flops(bounds: list[tuple[int, int]], costs: list[int]) -> list[int]:
    return [sum(costs[a:b]) for a, b in bounds]


def best_bottleneck(costs: list[int], stages: int) -> int:
    """The smallest largest-stage FLOPs over every contiguous split (brute force)."""
    n = len(costs)
    return min(max(sum(costs[a:b]) for a, b in zip((0, *cuts), (*cuts, n)))
               for cuts in itertools.combinations(range(1, n), stages - 1))


@pytest.mark.parametrize("stages", [2, 3, 4])
def test_stages_balance_forward_flops_with_the_head_on_the_last(stages):
    costs = block_costs(TEACHER)
    assert costs[-1] - costs[0] == 2 * 128256 * 3072 and len(set(costs[:-1])) == 1  # the head on the last block
    bounds = stage_blocks(TEACHER, stages, None)
    assert bounds[0][0] == 0 and bounds[-1][1] == 28 and all(a < b for a, b in bounds)
    assert max(stage_flops(bounds, costs)) == best_bottleneck(costs, stages)
    # the embedding (a lookup) costs stage 0 nothing: it holds as many blocks as the largest stage
    # less one at most, where charging its parameters left it ~4 short at P = 3
    assert len(range(*bounds[0])) >= max(b - a for a, b in bounds) - 1
