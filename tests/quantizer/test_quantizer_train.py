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


def test_heldout_keeps_a_few_items_on_a_small_set(tmp_path) -> None:
    import numpy as np

    from spear.quantizer.config import QuantizerDataConfig
    from spear.quantizer.data import open_embeddings
    from spear.quantizer.synthetic import write_embedding_shards
    from spear.storage import StorageConfig

    # 40 items of 50 frames: 5 % of the frames is one item; the minimum asks for four.
    x = np.random.default_rng(0).standard_normal((2000, 8)).astype(np.float32)
    write_embedding_shards(str(tmp_path), x, shards=2, item_frames=50)
    emb = open_embeddings(str(tmp_path), StorageConfig(), QuantizerDataConfig(), seed=0)
    assert len(emb.heldout_items) == 4
    none = open_embeddings(str(tmp_path), StorageConfig(), QuantizerDataConfig(heldout_fraction=0))
    assert none.heldout_items == []
