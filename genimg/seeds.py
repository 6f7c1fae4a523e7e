"""Per-item seeds and generator noise (case C11): a function of (job seed, item index) only.

Definition::

    item_seed(s, i) = SeedSequence(uint32[s & M32, s >> 32, i & M32, i >> 32]).generate_state(1, uint64)[0]
    noise           = numpy.random.default_rng(item_seed).standard_normal(z_dim, dtype=float32)

An item that a job's ``keep_if`` makes again (:mod:`genimg.keepif`) tries
seeds ``attempt_seed(s, i, k)`` for ``k = 0, 1, ..., regenerate``::

    attempt_seed(s, i, 0) = item_seed(s, i)
    attempt_seed(s, i, k) = SeedSequence(uint32[s & M32, s >> 32, i & M32, i >> 32],
                                         spawn_key=(ATTEMPT_DOMAIN, k)).generate_state(1, uint64)[0]

numpy assembles a seed sequence's input as the entropy words padded to its
pool size (4), then the spawn key: attempt 0 hashes the four words, attempt
k >= 1 the six words ``[..., 0x6B656570, k]``. No attempt's input is another
attempt's (or another item's), nor a child of ``SeedSequence.spawn`` (whose
spawn keys have one word); the 64-bit outputs of distinct inputs coincide
with probability 2**-64, as between any two items.

The entropy is four fixed-width 32-bit words because ``SeedSequence([s, i])``
packs each int into a variable number of words, so e.g. ``[1, 2**32 + 2]`` and
``[1 + 2*2**32, 1]`` would collide. Streams are numpy's (``SeedSequence`` and
``PCG64``, NEP 19): bit-identical for a given numpy version. The batch helpers
loop over the same per-item definition (about 36 µs an item), so an item's
noise never depends on how items were batched, sharded or retried.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from genimg.contract import Z_DIM
from genimg.errors import ValidationError
from genimg.limits import MAX_SEED, MAX_Z_DIM, check_int

_M32 = 0xFFFF_FFFF


def _entropy_words(job_seed: int, item_index: int) -> np.ndarray:
    return np.array([job_seed & _M32, job_seed >> 32, item_index & _M32, item_index >> 32],
                    dtype=np.uint32)

def item_seed(job_seed: int, item_index: int) -> int:
    """The seed of one item, in ``[0, 2**64)``: a function of its two arguments only.

    This is the seed recorded in the item's metadata; ``noise_from_seed`` of it
    reproduces the item's noise without knowing the job.

    Raises:
        ValidationError: ``field="seed"`` or ``"item_index"`` if out of ``[0, 2**63)``.
    """
    check_int(job_seed, "seed", 0, MAX_SEED)
    check_int(item_index, "item_index", 0, MAX_SEED)
    ss = np.random.SeedSequence(_entropy_words(int(job_seed), int(item_index)))
    return int(ss.generate_state(1, np.uint64)[0])


ATTEMPT_DOMAIN = 0x6B65_6570
"""First spawn-key word of a regeneration attempt's seed (ASCII ``keep``): keeps attempts apart from attempt 0."""
MAX_ATTEMPT = 2**32 - 1


def attempt_seed(job_seed: int, item_index: int, attempt: int) -> int:
    """The seed of an item's ``attempt``-th image (``keep_if`` regeneration), in ``[0, 2**64)``.

    Attempt 0 is the item's seed (:func:`item_seed`), so a job whose items all pass
    at once makes the same images as the job without ``keep_if``; attempt ``k >= 1``
    is drawn from the seed sequence of ``(job seed, item index)`` with spawn key
    ``(ATTEMPT_DOMAIN, k)`` (see the module docstring).

    Raises:
        ValidationError: ``field="seed"``, ``"item_index"`` or ``"attempt"`` out of range.
    """
    check_int(attempt, "attempt", 0, MAX_ATTEMPT)
    if attempt == 0:
        return item_seed(job_seed, item_index)
    check_int(job_seed, "seed", 0, MAX_SEED)
    check_int(item_index, "item_index", 0, MAX_SEED)
    ss = np.random.SeedSequence(_entropy_words(int(job_seed), int(item_index)),
                                spawn_key=(ATTEMPT_DOMAIN, int(attempt)))
    return int(ss.generate_state(1, np.uint64)[0])


def attempt_seeds(job_seed: int, item_indices: Iterable[int] | np.ndarray, attempt: int) -> np.ndarray:
    """:func:`attempt_seed` for many items at one attempt.

    Returns:
        uint64 array ``[B]``; element ``k`` is ``attempt_seed(job_seed, item_indices[k], attempt)``.
    """
    check_int(job_seed, "seed", 0, MAX_SEED)
    idx = _as_indices(item_indices)
    return np.array([attempt_seed(job_seed, int(i), attempt) for i in idx], dtype=np.uint64)


def noise_from_seed(seed: int, z_dim: int = Z_DIM) -> np.ndarray:
    """Generator noise for an item seed: ``default_rng(seed).standard_normal(z_dim, float32)``.

    Returns:
        float32 array of shape ``[z_dim]``, standard normal.
    """
    check_int(seed, "item_seed", 0, 2**64 - 1)
    check_int(z_dim, "z_dim", 1, MAX_Z_DIM)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(int(seed))))
    return rng.standard_normal(int(z_dim), dtype=np.float32)


def item_noise(job_seed: int, item_index: int, z_dim: int = Z_DIM) -> np.ndarray:
    """Generator noise ``Z`` of one item (the reference definition; see :func:`batch_noise`).

    Returns:
        float32 array of shape ``[z_dim]``.
    """
    return noise_from_seed(item_seed(job_seed, item_index), z_dim)


def _as_indices(item_indices: Iterable[int] | np.ndarray) -> np.ndarray:
    if isinstance(item_indices, range):
        arr = np.arange(item_indices.start, item_indices.stop, item_indices.step, dtype=np.int64)
    else:
        arr = np.asarray(item_indices if isinstance(item_indices, np.ndarray) else list(item_indices))
        if arr.size == 0:
            arr = arr.astype(np.int64)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise ValidationError(f"must be a 1-D sequence of integers (got dtype {arr.dtype}, "
                              f"shape {arr.shape})", field="item_indices")
    if arr.size and ((arr.dtype.kind == "i" and arr.min() < 0) or arr.max() > MAX_SEED):
        raise ValidationError(f"must be in [0, 2**63) (got min {arr.min()}, max {arr.max()})",
                              field="item_indices")
    return arr.astype(np.uint64)


def item_seeds(job_seed: int, item_indices: Iterable[int] | np.ndarray) -> np.ndarray:
    """:func:`item_seed` for many items.

    Returns:
        uint64 array ``[B]``; element ``k`` is ``item_seed(job_seed, item_indices[k])``.
    """
    check_int(job_seed, "seed", 0, MAX_SEED)
    idx = _as_indices(item_indices)
    return np.array([item_seed(job_seed, int(i)) for i in idx], dtype=np.uint64)


def batch_noise(job_seed: int, item_indices: Iterable[int] | np.ndarray, z_dim: int = Z_DIM) -> np.ndarray:
    """Generator noise for a batch; row ``k`` is ``item_noise(job_seed, item_indices[k])``.

    Args:
        job_seed: the job's seed.
        item_indices: item indices (list, range or integer array), any order.
        z_dim: noise length.

    Returns:
        float32 array ``[len(item_indices), z_dim]``.
    """
    check_int(z_dim, "z_dim", 1, MAX_Z_DIM)
    seeds = item_seeds(job_seed, item_indices)
    out = np.empty((len(seeds), int(z_dim)), dtype=np.float32)
    for k, seed in enumerate(seeds.tolist()):
        out[k] = noise_from_seed(seed, int(z_dim))
    return out
