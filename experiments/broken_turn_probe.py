"""broken_turn_probe.py: where a run's greedy policy writes invalid text, which token breaks the turn?

    python experiments/broken_turn_probe.py RUN [--prefix "[action] turn"]

Plays RUN's greedy evaluation episodes (afsft.py's held-out seeds). At each episode's first invalid turn it
prints the text, what was in the cell ahead (BabyAI), the policy's top tokens after `[action]` (the action
word) and after PREFIX in that state. An invalid turn leaves the observation as it was, so the greedy policy
writes the same text until the time limit; the tokens after PREFIX say where it leaves the grammar.
"""
import argparse
import collections
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from critic_probe import load_run  # noqa: E402

import afsft  # noqa: E402
import envs  # noqa: E402


def top_tokens(agent, obs, prefix, k=3):
    """The policy's k likeliest next tokens after the response `prefix` in the state `obs`."""
    inputs, state_mask, _, _ = afsft.encode(agent.processor, [obs["image"]], [obs["prompt"]],
                                            [prefix + " x"])
    with torch.no_grad():
        p = torch.softmax(agent.vlm.get_output_embeddings()(agent.features(inputs, state_mask)).float(), -1)
    tokenizer = agent.processor.tokenizer
    after = p[len(tokenizer(prefix, add_special_tokens=False)["input_ids"])]
    return ", ".join(f"{tokenizer.decode([i])!r} {after[i]:.2f}" for i in after.topk(k).indices)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--prefix", default="[action] turn")
    parser.add_argument("--episodes", type=int, default=50)
    args = parser.parse_args()
    agent, run_args, step = load_run(args.run)
    texts = collections.Counter()
    for seed in range(envs.EVAL_SEED, envs.EVAL_SEED + args.episodes):  # the evaluation's episodes
        env = afsft.make_env(run_args)
        obs, _ = env.reset(seed=seed)
        for _ in range(1000):
            response = afsft.generate(agent, [obs["image"]], [obs["prompt"]], 0.0,
                                      run_args.max_new_tokens, "cpu")[0]
            inner = getattr(env, "inner", None)
            cell = inner.grid.get(*inner.front_pos) if hasattr(inner, "front_pos") else None
            next_obs, _, terminated, truncated, info = env.step(response)
            if not info["valid"]:
                texts[response] += 1
                print(f"seed {seed}: {response!r}, ahead {cell.type if cell else 'nothing'}; "
                      f"after '[action]': {top_tokens(agent, obs, '[action]')}; "
                      f"after {args.prefix!r}: {top_tokens(agent, obs, args.prefix)}")
                break
            obs = next_obs
            if terminated or truncated:
                break
    print(f"{args.run} (step {step}): the first invalid texts of {args.episodes} episodes: "
          f"{texts.most_common(5)}")


if __name__ == "__main__":
    main()
