"""Training frames from items: the held-out split and the shuffled minibatch stream.

Whole items are held out (neighbouring frames are nearly equal, so holding out single frames
would leak): a seeded shuffle of items up to ``heldout_fraction`` of the frames, at most
``max_heldout_frames``. The training stream reads shards (through a callback, so any storage
works) in a seeded random order, epoch after epoch, through a shuffle buffer, so the whole set
never has to fit in memory. Reading shards is the caller's (``spear.pipeline.quantize``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

import numpy as np

from spear.quantizer.config import QuantizerDataConfig


def choose_heldout(items: dict[str, int], data: QuantizerDataConfig, seed: int) -> list[str]:
    """The held-out item ids among ``items`` (item id -> frames), in the seeded order."""
    total = sum(items.values())
    target = min(data.heldout_fraction * total, data.max_heldout_frames)
    order = sorted(items)
    random.Random(seed).shuffle(order)
    held: list[str] = []
    frames = 0
    # At least a few items even on a small set: one held-out item can be a single stationary
    # sound whose frames barely vary, which makes its RRL (relative to that variance) meaningless.
    min_items = min(data.min_heldout_items, len(order) // 4) if target > 0 else 0
    for item in order:
        if frames >= target and len(held) >= min_items:
            break
        if frames + items[item] > data.max_heldout_frames:
            continue
        held.append(item)
        frames += items[item]
    return held


def shuffled_batches(
    read_shard: Callable[[int], np.ndarray],
    num_shards: int,
    dim: int,
    batch_size: int,
    shuffle_frames: int,
    seed: int,
) -> Iterator[np.ndarray]:
    """Endless float32 minibatches (batch_size, dim) from ``read_shard(i)`` (frames (n, dim) of
    shard i, held-out items already dropped), shards in a new seeded order every epoch."""
    rng = np.random.default_rng(seed)
    buf = np.zeros((0, dim), np.float32)
    while True:
        got = 0
        for shard in rng.permutation(num_shards):
            frames = read_shard(int(shard))
            got += len(frames)
            buf = np.concatenate([buf, frames])
            if len(buf) < shuffle_frames:
                continue
            buf = buf[rng.permutation(len(buf))]
            while len(buf) >= batch_size:
                yield buf[:batch_size]
                buf = buf[batch_size:]
        if got == 0:
            raise ValueError("the shards hold no training frames")
        # End of an epoch: small data sets never fill the buffer, so flush it here.
        buf = buf[rng.permutation(len(buf))]
        while len(buf) >= batch_size:
            yield buf[:batch_size]
            buf = buf[batch_size:]
