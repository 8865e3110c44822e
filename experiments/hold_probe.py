"""hold_probe.py: does a run's hold on the action syntax reach states and prefixes its data never paired?

    python experiments/hold_probe.py RUN --states OTHER_DATA.pt [--turns 200]
    python experiments/hold_probe.py RUN --greedy-episodes 20 [--turns 200]

The grammar term of (6) holds pi(C_j|s_j), the mass on the tokens that may follow the response prefix y_<j,
only at the prefixes the data wrote in each state. A greedy policy that picks another first word in a
state the data never held then continues from a prefix it was never held at there (the main job's seed 0:
`[action] turn`, then ` forward`, with a key ahead). This probe takes `--turns` states of another dataset
(states RUN never trained on), teacher-forces every valid response of RUN's own dataset in each, and
reports pi(C_j|s_j) at every token: the share of (state, response, token) below 0.5, and the worst.
With `--greedy-episodes N` the states are instead those of RUN's own greedy evaluation episodes (afsft.py's
held-out seeds, each distinct state once): the states where a break of the template itself (`[action go
forward`, at a prefix every data state holds) shows, since no state of any dataset need be like them.
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--states", help="a dataset whose states are held out from RUN")
    parser.add_argument("--greedy-episodes", type=int, default=0,
                        help="instead, the states of RUN's own greedy evaluation episodes")
    parser.add_argument("--turns", type=int, default=200)
    args = parser.parse_args()
    if bool(args.states) == bool(args.greedy_episodes):
        parser.error("give one of --states and --greedy-episodes")
    agent, run_args, step = load_run(args.run)
    own = envs.load_dataset(run_args.offline, run_args.env)["episodes"]
    texts = sorted({ep["actions"][t] for ep in own for t in range(len(ep["actions"])) if ep["valid"][t]})
    if args.states:
        others = envs.load_dataset(args.states, run_args.env)["episodes"]
    else:
        others, _ = afsft.run_episodes(agent, run_args, args.greedy_episodes, 0.0, "cpu")
    states = [(envs.turn_image(ep, t), ep["prompts"][t]) for ep in others for t in range(len(ep["actions"]))]
    if args.greedy_episodes:  # a stuck episode repeats its state to the time limit: count it once
        states = list({(image.tobytes(), prompt): (image, prompt) for image, prompt in states}.values())
    states = states[:: max(1, len(states) // args.turns)][: args.turns]
    low, low_at, total, worst = collections.Counter(), collections.Counter(), 0, []
    for image, prompt in states:
        inputs, state_mask, tokens, lengths = afsft.encode(agent.processor, [image] * len(texts),
                                                           [prompt] * len(texts), texts)
        with torch.no_grad():
            logp = torch.log_softmax(agent.vlm.get_output_embeddings()(
                agent.features(inputs, state_mask)).float(), -1)
        valid = {tuple(t.tolist()) for t in torch.split(tokens, lengths.tolist())}
        sets = afsft.grammar_sets(valid, tokens, lengths)
        p_set = torch.stack([logp[n, c].logsumexp(0).exp() for n, c in enumerate(sets)])
        turn_of = torch.repeat_interleave(torch.arange(len(texts)), lengths)
        position = torch.cat([torch.arange(n) for n in lengths.tolist()])
        for n in range(len(p_set)):
            total += 1
            if p_set[n] < 0.5:
                low[texts[turn_of[n]]] += 1
                low_at[int(position[n])] += 1
            worst.append((p_set[n].item(), texts[turn_of[n]], int(position[n])))
    worst.sort()
    print(f"{args.run} (step {step}): {len(states)} held-out states x {len(texts)} valid responses; "
          f"pi(C_j|s_j) < 0.5 at {sum(low.values())} of {total} tokens ({sum(low.values()) / total:.4f}); "
          f"mean pi(C) {sum(w[0] for w in worst) / total:.4f}")
    print("  below 0.5, by response:", low.most_common(8))
    print("  below 0.5, by token position (0 is the first):", sorted(low_at.items()))
    print("  worst:", [(f"{p:.3f}", text, j) for p, text, j in worst[:5]])


if __name__ == "__main__":
    main()
