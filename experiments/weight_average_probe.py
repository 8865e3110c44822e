"""weight_average_probe.py: does an average of the policy's weights over the last offline steps keep
the syntax?

    python experiments/weight_average_probe.py --env babyai --offline data.pt --seed 0 --out runs/avg

Takes afsft.py's flags and trains one offline run exactly as `afsft.py --policy-average 0` does (the
averages never feed back, so the run, its checkpoint and its eval.json are that command's to the digit). It
also keeps two averages of the policy's trained weights (the LoRA adapters): an EMA at rate 0.01 per step,
and the uniform mean over the last 200 steps. At the end it evaluates each greedily on the same held-out
episodes as afsft.py's final evaluation, into eval_ema99.json and eval_last200.json beside eval.json. A
probe, not a method: the online rounds are not run, and nothing is saved of the averages but their
evaluations.

Session 45 made the average afsft.py's default (`--policy-average 0.01`, there a plain mean over the first
100 steps, then this EMA); the probe keeps the form it was measured in, with the average off for eval.json.
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import afsft  # noqa: E402

LAST = 200  # steps in the uniform mean
EMA_RATE = 0.01


def main():
    args = afsft.parse_args()
    if args.resume or args.online_rounds or args.offline_steps <= LAST:
        afsft.fail(f"a fresh offline run of more than {LAST} steps only: no --resume, no --online-rounds")
    args.policy_average = 0.0  # eval.json: the last weights, afsft.py's evaluation before its average
    run = afsft.setup(args)
    params = [p for p in run.agent.vlm.parameters() if p.requires_grad]
    ema = [p.detach().clone() for p in params]
    last = [torch.zeros_like(p) for p in params]
    while run.step < args.offline_steps:
        afsft.train_step(run, args, "offline")
        with torch.no_grad():
            for average, p in zip(ema, params):
                average.lerp_(p, EMA_RATE)
            if run.step > args.offline_steps - LAST:
                for total, p in zip(last, params):
                    total.add_(p)
    afsft.finish(run, args)
    for name, weights in (("ema99", ema), (f"last{LAST}", [total / LAST for total in last])):
        with torch.no_grad():
            for p, w in zip(params, weights):
                p.copy_(w)
        result = afsft.evaluate(run.agent, args, args.eval_episodes, run.device)
        with open(os.path.join(args.out, f"eval_{name}.json"), "w") as f:
            json.dump(result, f, indent=2)
        print(name, json.dumps(result))


if __name__ == "__main__":
    main()
