"""The global batch plan: disjoint ranks, and the same examples per step whatever the world size."""

from __future__ import annotations

import numpy as np

from sft_dist.data.batches import BatchPlan, eval_batches


def test_ranks_take_disjoint_slices_that_cover_the_global_batch():
    plan = BatchPlan(num_examples=50, micro_batch_size=3, grad_accum=2, world_size=2, seed=1)
    for step in range(plan.steps_per_epoch * 2):
        taken = np.concatenate([m for r in range(2) for m in plan.micro_batches(step, r)])
        assert sorted(taken) == sorted(plan.global_batch(step)) and len(set(taken)) == len(taken)


def test_global_batches_do_not_depend_on_world_size():
    one = BatchPlan(num_examples=40, micro_batch_size=4, grad_accum=2, world_size=1, seed=3)
    two = BatchPlan(num_examples=40, micro_batch_size=4, grad_accum=1, world_size=2, seed=3)
    for step in range(10):
        assert sorted(one.global_batch(step)) == sorted(two.global_batch(step))


def test_each_epoch_is_a_new_permutation_without_repeats():
    plan = BatchPlan(num_examples=16, micro_batch_size=2, grad_accum=1, world_size=2, seed=0)
    epoch0 = np.concatenate([plan.global_batch(s) for s in range(4)])
    epoch1 = np.concatenate([plan.global_batch(s) for s in range(4, 8)])
    assert sorted(epoch0) == list(range(16)) == sorted(epoch1) and list(epoch0) != list(epoch1)


def test_eval_shards_cover_every_example_once_with_equal_batch_counts():
    for n, world, mb in [(9, 2, 2), (7, 3, 4), (2, 4, 1)]:
        shards = [eval_batches(n, mb, r, world) for r in range(world)]
        assert len({len(s) for s in shards}) == 1
        seen = sorted(int(i) for s in shards for b in s for i in b)
        assert seen == list(range(n))
