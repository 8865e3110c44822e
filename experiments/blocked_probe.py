"""blocked_probe.py: at a BabyAI cell where `go forward` changes nothing, what do the policy and critic
prefer?

    python experiments/blocked_probe.py runs/afsft runs/afsft-online     # 30 probe episodes each

Walking into a wall or an object leaves the observation as it was, so a greedy policy that does it once does
it until the time limit. This probe plays fresh episodes with uniformly random moves (seeds that no dataset or
evaluation uses). In every state it encodes the four responses `go forward`, `turn left`, `turn right` and
`done` for the same prompt and reads the first token where they differ (" go", " turn", " done"). It prints,
separately for the states where the cell in front is empty and where it is not, the mean policy probability
pi(y|s) and critic value Q(s, y) of each. `turn left` and `turn right` share that token. A run that has
learned the reflex ranks `turn` first where the way is blocked, and `go` first where it is open.

With `--expert-path` the states are the expert's own (BabyAIBot drives), sorted by the expert's move (`go`
or `turn`) instead of by the cell in front, and it also prints how often the greedy first token and the
critic's larger Q of `go` and `turn` are the expert's word: does the run know when to go?

    python experiments/blocked_probe.py runs/afsft --expert-path --episodes 20"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import envs  # noqa: E402
from experiments.critic_probe import PROBE_SEED, at_first_difference, load_run  # noqa: E402

WORDS = ["go forward", "turn left", "turn right", "done"]


def probe(run, episodes, expert_path=False):
    agent, args, step = load_run(run)
    env = envs.make_env(args.env, text_view=args.text_view, scheme=args.scheme)
    if not isinstance(env, envs.BabyAIText):
        sys.exit("blocked_probe.py: only BabyAI runs have a cell in front to probe")
    rng, samples = np.random.default_rng(0), {}
    for i in range(episodes):
        obs, _ = env.reset(seed=PROBE_SEED + i)
        terminated = truncated = False
        while not (terminated or truncated):
            front = env.inner.grid.get(*env.inner.front_pos)
            expert = env.action_words[env.expert_action()] if expert_path else None
            _, pi, q, _, rows, ys = at_first_difference(agent, args, obs["image"], obs["prompt"], WORDS)
            s_k = rows[0]  # the responses share their prefix, so every row is the same state
            pis, qs = [float(pi[s_k, y]) for y in ys], [float(q[s_k, y]) for y in ys]
            if expert_path:  # its other moves (pick up, done, ...) are not probed
                cell, e = {"go forward": ("go", 0), "turn left": ("turn", 1), "turn right": ("turn", 1)}.get(
                    expert, (None, None))
            else:
                cell, e = "open" if front is None else "blocked", None
            if cell:
                right = [] if e is None else [pis[e] == max(pis), qs[e] == max(qs[:2])]
                samples.setdefault(cell, []).append(pis + qs + right)
            move = expert if expert_path else WORDS[rng.integers(3)]
            obs, _, terminated, truncated, _ = env.step(envs.format_response(move, env.scheme))
            if env.turn >= 12 and not expert_path:  # a dozen random moves per episode: enough states
                break
    print(f"{run} (step {step})")
    for cell, values in samples.items():
        mean = np.mean(values, 0)
        line = (f"  {cell:8} {len(values):4} states   pi go/turn/done {mean[0]:.3f} {mean[1]:.3f} "
                f"{mean[3]:.3f}   Q go/turn/done {mean[4]:+.3f} {mean[5]:+.3f} {mean[7]:+.3f}")
        if expert_path:
            line += f"   the expert's word: greedy's first token {mean[8]:.2f}, the larger Q {mean[9]:.2f}"
        print(line)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories (with checkpoint/)")
    parser.add_argument("--episodes", type=int, default=30, help="probe episodes per run")
    parser.add_argument("--expert-path", action="store_true",
                        help="the expert's states, sorted by its move (go or turn)")
    args = parser.parse_args()
    for run in args.runs:
        probe(run, args.episodes, args.expert_path)


if __name__ == "__main__":
    main()
