from __future__ import annotations

import numpy as np

from kernels.batching import LENGTH_BUCKETS, padded_length, padding_efficiency, plan_batches


def _lengths(n=2000, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(8, 300, size=n)


def test_every_pair_in_exactly_one_batch():
    lengths = _lengths()
    for padded in (True, False):
        batches = plan_batches(lengths, 4096, padded=padded)
        idx = np.concatenate(batches)
        assert sorted(idx.tolist()) == list(range(len(lengths)))


def test_budget_respected_by_cost_rule():
    lengths = _lengths()
    for b in plan_batches(lengths, 4096, padded=True):
        assert len(b) * padded_length(int(lengths[b].max())) <= 4096 or len(b) == 1
    for b in plan_batches(lengths, 4096, padded=False):
        assert int(lengths[b].sum()) <= 4096 or len(b) == 1


def test_single_pair_over_budget_gets_its_own_batch():
    batches = plan_batches(np.array([600, 10, 10]), 256, padded=True)
    assert [len(b) for b in batches][0] == 1


def test_max_batch_size_caps_count():
    batches = plan_batches(np.full(100, 8), 10**6, padded=False, max_batch_size=32)
    assert max(len(b) for b in batches) == 32


def test_sorting_beats_input_order_on_padding():
    lengths = _lengths()
    sorted_plan = plan_batches(lengths, 8192, padded=True, buckets=None)
    unsorted_plan = plan_batches(lengths, 8192, padded=True, sort=False, buckets=None)
    real, computed = padding_efficiency(lengths, sorted_plan, padded=True, buckets=None)
    real_u, computed_u = padding_efficiency(lengths, unsorted_plan, padded=True, buckets=None)
    assert real == real_u
    assert real / computed >= 0.95
    assert real_u / computed_u < 0.7


def test_padded_length_buckets():
    assert padded_length(1) == LENGTH_BUCKETS[0]
    assert padded_length(129) == 160
    assert padded_length(513) == 576
    assert padded_length(13, None) == 13
