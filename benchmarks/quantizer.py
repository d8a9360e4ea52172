"""MVQ side by side with the reference ``multi_quantization`` (k2-fsa) on the same vectors.

Structured synthetic data (mixture of low-rank Gaussians), equal bits (C x 256) and equal
training steps. Prints held-out RRL and encode vectors/s for refinement rounds 0..5 on CPU (and
CUDA when available), and each trainer's wall time and time to reach a target RRL.

    uv run python benchmarks/quantizer.py --steps 40 --dim 1024 --eval-vectors 256
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from spear.quantizer.config import QuantizerTrainConfig
from spear.quantizer.mvq import QuantizerInfo, relative_reconstruction_loss
from spear.quantizer.synthetic import mixture_of_low_rank_gaussians
from spear.quantizer.train import QuantizerTrainer


def held_rrl(decode, encode, x: torch.Tensor, rounds: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    codes = encode(x, rounds)
    dt = time.perf_counter() - t0
    with torch.no_grad():
        return relative_reconstruction_loss(x, decode(codes)), len(x) / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--codebooks", type=int, default=16)
    ap.add_argument("--steps", type=int, default=40, help="steps per phase, both trainers")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--train-vectors", type=int, default=20000)
    ap.add_argument("--eval-vectors", type=int, default=256)
    ap.add_argument("--target-rrl", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-reference", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger().setLevel(logging.WARNING)

    data = torch.from_numpy(
        mixture_of_low_rank_gaussians(args.train_vectors + args.eval_vectors, args.dim, seed=1)
    )
    # Both quantisers see the same per-dimension normalised data.
    data = (data - data.mean(0)) / data.std(0)
    train, held = data[: args.train_vectors], data[args.train_vectors :]
    g = torch.Generator().manual_seed(0)
    batches = [
        train[torch.randint(0, len(train), (args.batch,), generator=g)]
        for _ in range(2 * args.steps + 1)
    ]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows: list[tuple[str, str, int, float, float]] = []
    train_rows: list[tuple[str, float, float]] = []

    # -- ours --
    torch.manual_seed(0)
    cfg = QuantizerTrainConfig(
        num_codebooks=args.codebooks, phase_steps=args.steps, batch_size=args.batch
    )
    info = QuantizerInfo(dim=args.dim, num_codebooks=args.codebooks, codebook_size=256)
    trainer = QuantizerTrainer(cfg, info, torch.device("cpu"))
    t0, hit = time.perf_counter(), float("nan")
    i = 0
    while not trainer.done():
        trainer.step(batches[i])
        i += 1
        check = trainer.phase == 2 and hit != hit and i % 10 == 0
        q_now = trainer.quantizer
        if check and held_rrl(q_now.decode, q_now.encode, held, 5)[0] < args.target_rrl:
            hit = time.perf_counter() - t0  # includes the checks' encode time
    train_rows.append(("spear", time.perf_counter() - t0, hit))
    ours = trainer.quantizer.eval()
    for dev in devices:
        q = ours.to(dev)
        for r in range(6):
            rrl, vps = held_rrl(
                lambda c, q=q: q.decode(c).cpu(),
                lambda x, r, q=q, dev=dev: q.encode(x.to(dev), r),
                held,
                r,
            )
            rows.append(("spear", dev, r, rrl, vps))

    # -- reference --
    if not args.skip_reference:
        import multi_quantization as mq

        torch.manual_seed(0)
        ref_tr = mq.QuantizerTrainer(
            dim=args.dim,
            bytes_per_frame=args.codebooks,
            device=torch.device("cpu"),
            phase_one_iters=args.steps,
            phase_two_iters=args.steps,
        )
        t0, hit, i = time.perf_counter(), float("nan"), 0
        while not ref_tr.done():
            ref_tr.step(batches[i])
            i += 1
        train_rows.append(("reference", time.perf_counter() - t0, hit))
        ref = ref_tr.get_quantizer()
        for dev in devices:
            rq = ref.to(dev)
            for r in range(6):
                with torch.no_grad():
                    rrl, vps = held_rrl(
                        lambda c, rq=rq: rq.decode(c).cpu(),
                        lambda x, r, rq=rq, dev=dev: rq.encode(
                            x.to(dev), refine_indexes_iters=r, as_bytes=True
                        ),
                        held,
                        r,
                    )
                rows.append(("reference", dev, r, rrl, vps))

    print(
        f"\nD={args.dim}, {args.codebooks}x256, {args.steps}+{args.steps} steps of {args.batch}, "
        f"{len(held)} held-out vectors, {args.threads} threads"
    )
    print(f"{'impl':>10} {'device':>6} {'rounds':>6} {'held-out RRL':>12} {'vectors/s':>10}")
    for impl, dev, r, rrl, vps in rows:
        print(f"{impl:>10} {dev:>6} {r:>6} {rrl:>12.4f} {vps:>10.0f}")
    print(f"\n{'impl':>10} {'train s':>8} {'s to RRL<' + str(args.target_rrl):>14}")
    for impl, total, hit in train_rows:
        print(f"{impl:>10} {total:>8.1f} {hit:>14.1f}")


if __name__ == "__main__":
    main()
