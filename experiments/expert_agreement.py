"""expert_agreement.py: how often a run's greedy action is the scripted expert's, on held-out states.

    python experiments/expert_agreement.py runs/sft                  # 50 held-out expert episodes
    python experiments/expert_agreement.py runs/sft runs/afsft --episodes 100

It plays the env's scripted expert on seeds that no dataset or evaluation uses and, in every state the
expert visits, asks the run's policy for its greedy response (the prompt and image are the state's, so
the policy is judged on the expert's state distribution, not its own). Agreement is the fraction of
states where the response's action text is the expert's; an invalid response disagrees.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from critic_probe import PROBE_SEED, load_run  # noqa: E402

import afsft  # noqa: E402
import envs  # noqa: E402


def expert_states(args, episodes):
    """(image, prompt, the expert's action text) in every state of `episodes` expert episodes."""
    env = afsft.make_env(args)
    states = []
    try:
        for i in range(episodes):
            obs, _ = env.reset(seed=PROBE_SEED + i)
            terminated = truncated = False
            while not (terminated or truncated):
                action = env.action_words[env.expert_action()]
                states.append((obs["image"], obs["prompt"], action))
                obs, _, terminated, truncated, _ = env.step(envs.format_response(action, env.scheme))
    finally:
        env.close()
    return states


def agreement(agent, args, states, batch=32):
    agree = 0
    for i in range(0, len(states), batch):
        images, prompts, actions = zip(*states[i : i + batch])
        responses = afsft.generate(agent, images, prompts, 0.0, args.max_new_tokens, "cpu")
        agree += sum(envs.parse_agent(r, args.scheme) == a for r, a in zip(responses, actions))
    return agree / len(states)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories written by afsft.py")
    parser.add_argument("--episodes", type=int, default=50, help="held-out expert episodes (default: 50)")
    opt = parser.parse_args(argv)
    for run in opt.runs:
        agent, args, step = load_run(run)
        states = expert_states(args, opt.episodes)
        rate = agreement(agent, args, states)
        print(f"{run} ({args.env}, step {step}): greedy action = expert's in {rate:.3f} of {len(states)} "
              "held-out states")


if __name__ == "__main__":
    main()
