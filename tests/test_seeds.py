"""Per-item seeds and noise (case C11): a function of (job seed, item index) only."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from genimg.errors import ValidationError
from genimg.seeds import batch_noise, item_noise, item_seed, item_seeds, noise_from_seed
from genimg.limits import MAX_SEED
from genimg.contract import Z_DIM
from genimg.shardplan import plan_shards

JOB_SEED = 1234


def _noise_of_item_in_shards(item: int, total: int, shard_size: int, sub_batch: int) -> np.ndarray:
    """What a worker would feed Triton for ``item``: shard plan, then sub-batches of the shard."""
    plan = plan_shards(total, shard_size)
    start, stop = plan.shard_range(plan.shard_of_item(item))
    for lo in range(start, stop, sub_batch):
        batch = list(range(lo, min(lo + sub_batch, stop)))
        if item in batch:
            return batch_noise(JOB_SEED, batch)[batch.index(item)]
    raise AssertionError("item not in its shard")


def test_item_42_noise_is_bit_identical_in_batch_40_to_43_alone_and_in_other_shard_sizes() -> None:
    alone = item_noise(JOB_SEED, 42)
    in_batch = batch_noise(JOB_SEED, [40, 41, 42, 43])[2]
    batch_alone = batch_noise(JOB_SEED, [42])[0]
    reversed_batch = batch_noise(JOB_SEED, [43, 42, 41, 40])[1]
    shard_7 = _noise_of_item_in_shards(42, total=100, shard_size=7, sub_batch=3)
    shard_50 = _noise_of_item_in_shards(42, total=100, shard_size=50, sub_batch=16)
    for other in (in_batch, batch_alone, reversed_batch, shard_7, shard_50):
        assert other.dtype == np.float32 and other.shape == (Z_DIM,)
        assert other.tobytes() == alone.tobytes()


def test_each_item_records_its_own_seed_which_reproduces_its_noise() -> None:
    seeds = item_seeds(JOB_SEED, [40, 41, 42, 43])
    assert seeds.dtype == np.uint64
    assert seeds.tolist() == [item_seed(JOB_SEED, i) for i in (40, 41, 42, 43)]
    assert len(set(seeds.tolist())) == 4
    for i, seed in zip((40, 41, 42, 43), seeds.tolist()):
        # the metadata seed alone is enough: numpy's default_rng reproduces the noise
        z = np.random.default_rng(seed).standard_normal(Z_DIM, dtype=np.float32)
        assert z.tobytes() == item_noise(JOB_SEED, i).tobytes() == noise_from_seed(seed).tobytes()


def test_item_seed_and_noise_are_pinned_so_a_numpy_stream_change_is_noticed() -> None:
    assert item_seed(1234, 42) == 3305811667307235245
    assert item_noise(1234, 42)[:4].view(np.uint32).tolist() == [1061646486, 1059000035,
                                                                 1061027110, 3215057828]


def test_item_seed_entropy_is_fixed_width_so_different_pairs_never_collide() -> None:
    # numpy packs each int of SeedSequence([a, b]) into a variable number of 32-bit
    # words, so these two pairs would give the same stream; genimg's encoding does not.
    a, b = (1, 2**32 + 2), (1 + 2 * 2**32, 1)
    naive = [np.random.SeedSequence(list(p)).generate_state(2).tolist() for p in (a, b)]
    assert naive[0] == naive[1]
    assert item_seed(*a) != item_seed(*b)


def test_different_job_seeds_give_different_item_seeds() -> None:
    assert item_seed(0, 0) != item_seed(1, 0) != item_seed(0, 1)


@pytest.mark.parametrize("job_seed", [0, 1, 2**32 - 1, 2**32, 987654321987654321, MAX_SEED])
def test_batch_path_matches_the_reference_bit_for_bit(job_seed: int) -> None:
    rng = np.random.default_rng(job_seed % 1000)
    items = [0, 1, 2**32 - 1, 2**32, 10**9 - 1, MAX_SEED] + rng.integers(0, 2**40, 20).tolist()
    batch = batch_noise(job_seed, np.array(items, dtype=np.int64))
    reference = np.stack([item_noise(job_seed, i) for i in items])
    assert batch.tobytes() == reference.tobytes()
    assert item_seeds(job_seed, items).tolist() == [item_seed(job_seed, i) for i in items]


def test_batch_noise_accepts_ranges_and_empty_batches() -> None:
    assert batch_noise(JOB_SEED, range(5, 9)).tobytes() == batch_noise(JOB_SEED, [5, 6, 7, 8]).tobytes()
    assert batch_noise(JOB_SEED, []).shape == (0, Z_DIM)
    assert batch_noise(JOB_SEED, [3], z_dim=8).shape == (1, 8)


def test_noise_is_standard_normal_float32() -> None:
    z = batch_noise(JOB_SEED, range(2_000))
    assert z.dtype == np.float32 and z.shape == (2_000, Z_DIM)
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1.0) < 0.01


@pytest.mark.parametrize(("job_seed", "item", "field"), [
    (-1, 0, "seed"), (2**63, 0, "seed"), (True, 0, "seed"), (1.0, 0, "seed"),
    (0, -1, "item_index"), (0, 2**63, "item_index"), (0, "42", "item_index"),
])
def test_seeds_out_of_range_are_rejected(job_seed: Any, item: Any, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        item_seed(job_seed, item)
    assert info.value.field == field


@pytest.mark.parametrize("indices", [[-1], [0.5], [[1, 2]], [True], [2**64 - 1]])
def test_batch_noise_rejects_indices_that_are_not_non_negative_integers(indices: Any) -> None:
    with pytest.raises(ValidationError) as info:
        batch_noise(JOB_SEED, indices)
    assert info.value.field == "item_indices"
