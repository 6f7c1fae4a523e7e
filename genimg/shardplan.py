"""The shard plan: items ``[0, N)`` cut into contiguous shards, O(1) memory; prompt-major item order.

Items are ordered prompt-major: item ``i`` uses prompt ``i // images_per_prompt``
and is that prompt's image number ``i % images_per_prompt``.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator
from dataclasses import dataclass

from genimg.errors import ValidationError
from genimg.limits import (
    MANIFEST_PART_ROWS,
    MAX_IMAGES_PER_PROMPT,
    MAX_MANIFEST_PART_SHARDS,
    MAX_SEED,
    MAX_SHARD_SIZE,
    MAX_TOTAL_ITEMS,
    check_index,
    check_int,
    short,
)


@dataclass(frozen=True, slots=True)
class ShardPlan:
    """Items ``[0, total_items)`` cut into contiguous shards of ``shard_size``.

    Holds two integers; every range is computed on demand (O(1) memory).
    The last shard may be shorter.
    """

    total_items: int
    shard_size: int

    @property
    def num_shards(self) -> int:
        return -(-self.total_items // self.shard_size)

    def __len__(self) -> int:
        return self.num_shards

    def shard_range(self, shard_index: int) -> tuple[int, int]:
        """Item indices ``[start, stop)`` of one shard.

        Raises:
            ValidationError: ``field="shard_index"`` if out of range.
        """
        if isinstance(shard_index, bool) or not isinstance(shard_index, numbers.Integral) \
                or not 0 <= shard_index < self.num_shards:
            raise ValidationError(f"must be an integer in [0, {self.num_shards}) "
                                  f"(got {short(shard_index)})", field="shard_index")
        start = int(shard_index) * self.shard_size
        return start, min(start + self.shard_size, self.total_items)

    def shard_of_item(self, item_index: int) -> int:
        """Index of the shard that holds ``item_index``."""
        check_index(item_index, "item_index", self.total_items)
        return int(item_index) // self.shard_size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """Yield each shard's ``(start, stop)`` lazily, in order."""
        for start in range(0, self.total_items, self.shard_size):
            yield start, min(start + self.shard_size, self.total_items)


def plan_shards(total_items: int, shard_size: int) -> ShardPlan:
    """Plan a job's shards in O(1) time and memory.

    Args:
        total_items: 1..``MAX_TOTAL_ITEMS``.
        shard_size: 1..``MAX_SHARD_SIZE``.

    Raises:
        ValidationError: naming ``total_items`` or ``shard_size``.
    """
    check_int(total_items, "total_items", 1, MAX_TOTAL_ITEMS)
    check_int(shard_size, "shard_size", 1, MAX_SHARD_SIZE)
    return ShardPlan(int(total_items), int(shard_size))


def manifest_part_shards_for(shard_size: int) -> int:
    """Shards a manifest part covers by default: ``MANIFEST_PART_ROWS // shard_size``, in 1..1,000.

    Shards of 1,000 items give parts of 100 shards (100,000 rows); shards of 100 or fewer, 1,000 shards.
    """
    return max(1, min(MAX_MANIFEST_PART_SHARDS, MANIFEST_PART_ROWS // max(1, int(shard_size))))


def item_to_prompt_index(item_index: int, images_per_prompt: int) -> int:
    """Index of the prompt that item ``item_index`` renders (prompt-major order)."""
    check_int(item_index, "item_index", 0, MAX_SEED)
    check_int(images_per_prompt, "images_per_prompt", 1, MAX_IMAGES_PER_PROMPT)
    return int(item_index) // int(images_per_prompt)
