"""Training the quantiser on structured synthetic data."""

from __future__ import annotations

import torch

from spear.quantizer.config import QuantizerTrainConfig
from spear.quantizer.mvq import QuantizerInfo, relative_reconstruction_loss
from spear.quantizer.synthetic import mixture_of_low_rank_gaussians


def test_training_reaches_rrl_bound() -> None:
    torch.manual_seed(0)
    data = torch.from_numpy(mixture_of_low_rank_gaussians(6000, 32, components=8, rank=4))
    train, held = data[:5000], data[5000:]
    from spear.quantizer.train import QuantizerTrainer

    cfg = QuantizerTrainConfig(num_codebooks=4, codebook_size=16, phase_steps=150, batch_size=256)
    trainer = QuantizerTrainer(
        cfg, QuantizerInfo(dim=32, num_codebooks=4, codebook_size=16), torch.device("cpu")
    )
    g = torch.Generator().manual_seed(0)
    while not trainer.done():
        trainer.step(train[torch.randint(0, len(train), (256,), generator=g)])
    q = trainer.quantizer
    assert (q.num_codebooks, q.codebook_size) == (4, 16)
    with torch.no_grad():
        rrl = relative_reconstruction_loss(held, q.decode(q.encode(held, 5)))
    # 16 bits for 32 dims of 8 clusters of rank 4: a trained quantiser gets about 0.20 here
    # (an untrained one is above 1); the bound leaves room for other platforms.
    assert rrl < 0.3, rrl


def test_heldout_keeps_a_few_items_on_a_small_set() -> None:
    from spear.quantizer.config import QuantizerDataConfig
    from spear.quantizer.data import choose_heldout

    # 40 items of 50 frames: 5 % of the frames is one item; the minimum asks for four.
    items = {f"item{i:03d}": 50 for i in range(40)}
    held = choose_heldout(items, QuantizerDataConfig(), seed=0)
    assert len(held) == 4 and set(held) <= set(items)
    assert choose_heldout(items, QuantizerDataConfig(), seed=0) == held  # seeded
    assert choose_heldout(items, QuantizerDataConfig(), seed=1) != held
    assert choose_heldout(items, QuantizerDataConfig(heldout_fraction=0), seed=0) == []
    capped = QuantizerDataConfig(heldout_fraction=0.5, max_heldout_frames=120)
    assert len(choose_heldout(items, capped, seed=0)) == 2  # 2 x 50 frames fit under 120


def test_shuffled_batches_cover_every_frame_each_epoch() -> None:
    import numpy as np

    from spear.quantizer.data import shuffled_batches

    # Three shards of 40, 24 and 32 frames; frame value = its global index.
    shards = [np.arange(a, b, dtype=np.float32)[:, None] for a, b in [(0, 40), (40, 64), (64, 96)]]
    reads: list[int] = []

    def read(i: int) -> np.ndarray:
        reads.append(i)
        return shards[i]

    stream = shuffled_batches(read, 3, 1, batch_size=16, shuffle_frames=1000, seed=0)
    epoch = np.concatenate([next(stream) for _ in range(6)])  # 96 frames = 6 batches of 16
    assert sorted(epoch[:, 0].tolist()) == list(range(96))
    assert epoch[:, 0].tolist() != list(range(96))  # shuffled
    assert sorted(reads) == [0, 1, 2]
