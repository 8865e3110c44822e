"""episode_outcomes.py: how a trained run's evaluation episodes end, and how many turns it wastes.

    python experiments/episode_outcomes.py runs/sft runs/afsft              # 100 greedy episodes each
    python experiments/episode_outcomes.py runs/afsft --episodes 50 --temperature 1
    python experiments/episode_outcomes.py runs/afsft --responses 5      # also its 5 most frequent responses

It replays afsft.py's final evaluation (the same held-out seeds, the same decoding) and sorts the
episodes into three ends:
- `success`: the return is > 0;
- `ended, no reward`: the episode terminated without success. In BabyAI that is a `done` said anywhere but
  in front of the mission's object: the decoy's consistent mistake in a `mixed` dataset;
- `time limit`: the episode was truncated.
`stuck turns` is the share of all turns whose action was valid and left the observation (image and
prompt) exactly as it was: in BabyAI mostly `go forward` into a wall or an object. A greedy policy that does
this once does it until the time limit, since its input does not change.
`--responses N` also lists each run's N most frequent responses, marked valid or not: where a run lost its
action syntax, they show how (for instance `[action] - not not not ...`: the action, then no end of turn).
"""
import argparse
import collections
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from critic_probe import load_run  # noqa: E402

import afsft  # noqa: E402


@torch.no_grad()
def outcomes(agent, args, episodes, temperature):
    # the seeds afsft.py evaluates on
    done, success = afsft.run_episodes(agent, args, episodes, temperature, "cpu")
    wins = [success(float(ep["rewards"].sum())) for ep in done]
    ends = {"success": sum(wins),
            "ended, no reward": sum(ep["terminated"] and not won for ep, won in zip(done, wins)),
            "time limit": sum(ep["truncated"] and not won for ep, won in zip(done, wins))}
    stuck = turns = 0
    for ep in done:
        same = [bool((ep["images"][t] == ep["images"][t + 1]).all())
                and ep["prompts"][t] == ep["prompts"][t + 1]
                for t in range(len(ep["actions"]) - 1)]
        stuck += sum(s and bool(v) for s, v in zip(same, ep["valid"]))
        turns += len(ep["actions"])
    responses = collections.Counter((a, bool(v)) for ep in done for a, v in zip(ep["actions"], ep["valid"]))
    return {k: v / episodes for k, v in ends.items()} | {"stuck turns": stuck / turns}, responses


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories written by afsft.py")
    p.add_argument("--episodes", type=int, default=100, help="evaluation episodes (default: 100)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 decodes greedily, as afsft.py's evaluation")
    p.add_argument("--responses", type=int, default=0, help="also list each run's N most frequent responses")
    opt = p.parse_args()
    torch.manual_seed(0)
    print("| run | step | success | ended, no reward | time limit | stuck turns |\n|---|---|---|---|---|---|")
    most_frequent = {}
    for run in opt.runs:
        agent, args, step = load_run(run)
        row, responses = outcomes(agent, args, opt.episodes, opt.temperature)
        print(f"| {run} | {step} | " + " | ".join(f"{v:.2f}" for v in row.values()) + " |", flush=True)
        most_frequent[run] = (responses.most_common(opt.responses), sum(responses.values()))
    for run, (responses, turns) in most_frequent.items() if opt.responses else ():
        print(f"\n{run}: the {len(responses)} most frequent of {turns} responses")
        for (response, valid), count in responses:
            print(f"  {count:5d}  {'valid  ' if valid else 'INVALID'}  {response!r}")


if __name__ == "__main__":
    main()
