"""alternatives_cost.py: what `--hold-alternatives K` adds to a gradient step.

    python experiments/alternatives_cost.py DATASET [--k 2,4] [--updates 6]

Times `afsft.gradient_step` on one batch of DATASET (the process's CPU time, medians after one warm-up
update), for SFT, AFSFT and AFSFT with `--hold-alternatives K`, and prints each over SFT's time. SFT and
AFSFT take 32 data turns; with K, as `afsft.train_step` samples them after the warm-up, 32 - K data turns
plus up to K alternatives in a second forward pass. All AFSFT runs use `--drop-margin 0`, so that the filter
drops tokens in many turns from the first step: the worst case, K alternatives every step. The bar for
AFSFT is 1.15x (experiments/benchmark.py).
"""
import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import afsft  # noqa: E402
import envs  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset")
    p.add_argument("--k", default="2,4", help="comma-separated values of --hold-alternatives")
    p.add_argument("--updates", type=int, default=6, help="timed updates per method, after one warm-up")
    opt = p.parse_args()
    buffer = afsft.Buffer(envs.load_dataset(opt.dataset)["episodes"])
    methods = {"SFT": dict(filter="none"), "AFSFT": dict(drop_margin=0.0)}
    methods.update({f"AFSFT, --hold-alternatives {k}": dict(drop_margin=0.0, hold_alternatives=int(k))
                    for k in opt.k.split(",")})
    seconds = {}
    for name, changes in methods.items():
        torch.manual_seed(0)
        args = afsft.Args(device="cpu", **changes)
        batch = buffer.sample(np.random.default_rng(0), args.batch_turns - args.hold_alternatives, 8)
        agent = afsft.load_agent(args, afsft.TINY_BASE)
        optimizer = torch.optim.AdamW([w for w in agent.parameters() if w.requires_grad], lr=args.lr)
        times = []
        for _ in range(opt.updates + 1):
            start = time.process_time()
            afsft.gradient_step(agent, optimizer, batch, args, False, "cpu")
            times.append(time.process_time() - start)
        seconds[name] = float(np.median(times[1:]))
    for name, s in seconds.items():
        print(f"{name}: {s:.3f} s per update, {s / seconds['SFT']:.2f}x SFT's")


if __name__ == "__main__":
    main()
