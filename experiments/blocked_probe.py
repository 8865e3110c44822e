"""blocked_probe.py: at a BabyAI cell where `go forward` changes nothing, what do the policy and critic
prefer?

    python experiments/blocked_probe.py runs/afsft runs/afsft-online     # 30 probe episodes each

Walking into a wall or an object leaves the observation as it was, so a greedy policy that does it once does
it until the time limit. This probe plays fresh episodes with uniformly random moves (seeds that no dataset or
evaluation uses). In every state it encodes the four responses `go forward`, `turn left`, `turn right` and
`done` for the same prompt and reads the first token where they differ (" go", " turn", " done"). It prints,
separately for the states where the cell in front is empty and where it is not, the mean policy probability
pi(y|s) and critic value Q(s, y) of each. `turn left` and `turn right` share that token. A run that has
learned the reflex ranks `turn` first where the way is blocked, and `go` first where it is open."""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import envs  # noqa: E402
from experiments.critic_probe import PROBE_SEED, at_first_difference, load_run  # noqa: E402

WORDS = ["go forward", "turn left", "turn right", "done"]


def probe(run, episodes):
    agent, args, step = load_run(run)
    env = envs.make_env(args.env, text_view=args.text_view, scheme=args.scheme)
    if not isinstance(env, envs.BabyAIText):
        sys.exit("blocked_probe.py: only BabyAI runs have a cell in front to probe")
    rng, samples = np.random.default_rng(0), {"open": [], "blocked": []}
    for i in range(episodes):
        obs, _ = env.reset(seed=PROBE_SEED + i)
        terminated = truncated = False
        while not (terminated or truncated):
            front = env.inner.grid.get(*env.inner.front_pos)
            _, pi, q, _, rows, ys = at_first_difference(agent, args, obs["image"], obs["prompt"], WORDS)
            s_k = rows[0]  # the responses share their prefix, so every row is the same state
            samples["open" if front is None else "blocked"].append([float(pi[s_k, y]) for y in ys] +
                                                                   [float(q[s_k, y]) for y in ys])
            obs, _, terminated, truncated, _ = env.step(envs.format_response(WORDS[rng.integers(3)],
                                                                             env.scheme))
            if env.turn >= 12:  # a dozen random moves per episode: enough states, little time
                break
    print(f"{run} (step {step})")
    for cell, values in samples.items():
        mean = np.mean(values, 0)
        print(f"  {cell:8} {len(values):4} states   pi go/turn/done {mean[0]:.3f} {mean[1]:.3f} {mean[3]:.3f}"
              f"   Q go/turn/done {mean[4]:+.3f} {mean[5]:+.3f} {mean[7]:+.3f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories (with checkpoint/)")
    parser.add_argument("--episodes", type=int, default=30, help="probe episodes per run")
    args = parser.parse_args()
    for run in args.runs:
        probe(run, args.episodes)


if __name__ == "__main__":
    main()
