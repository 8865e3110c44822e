"""end_token_probe.py: where a run writes invalid text after a whole action, does it still end the turn?

    python experiments/end_token_probe.py RUN [OTHER_RUN ...] --action "turn left"

Replays RUN's greedy evaluation (afsft.py's held-out seeds), takes the first state where it wrote invalid
text, and 20 states where it wrote `[action] <action>` validly. For each run given, it prints the
probability of the end token after the whole response `[action] <action>` in those states, and the top
three next tokens in the stuck state. An invalid turn leaves the observation as it was, so one such state
under greedy decoding costs a whole episode of invalid turns.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from critic_probe import load_run  # noqa: E402

import afsft  # noqa: E402
import envs  # noqa: E402


@torch.no_grad()
def end_probabilities(agent, states, response):
    images, prompts = zip(*states)
    inputs, state_mask, _, lengths = afsft.encode(agent.processor, images, prompts, [response] * len(states))
    logits = agent.vlm.get_output_embeddings()(agent.features(inputs, state_mask)).float()
    logp = torch.log_softmax(logits, -1)
    after_response = torch.stack([turn[-1] for turn in torch.split(logp, lengths.tolist())]).exp()
    return after_response[:, afsft.end_token_id(agent.processor)], after_response


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories written by afsft.py; the first is replayed")
    p.add_argument("--action", default="turn left", help="the whole action the stuck text starts with")
    p.add_argument("--episodes", type=int, default=50, help="evaluation episodes replayed (default: 50)")
    opt = p.parse_args()
    agent, args, _ = load_run(opt.runs[0])
    response = envs.format_response(opt.action, args.scheme)
    done, _ = afsft.run_episodes(agent, args, opt.episodes, 0.0, "cpu")
    turns = [(ep["images"][t], ep["prompts"][t], ep["actions"][t], ep["valid"][t])
             for ep in done for t in range(len(ep["actions"]))]
    stuck = [(image, prompt) for image, prompt, action, valid in turns if not valid][:1]
    normal = [(image, prompt) for image, prompt, action, valid in turns if valid and action == response][:20]
    if not stuck or not normal:
        sys.exit(f"{opt.runs[0]}: no invalid turn, or no valid {response!r}, in {opt.episodes} episodes")
    tokenizer = agent.processor.tokenizer
    for run in opt.runs:
        agent = load_run(run)[0]
        p_end, after = end_probabilities(agent, stuck + normal, response)
        top = after[0].topk(3)
        print(f"{run}: P(end | {response!r}) in the stuck state {p_end[0]:.3f}, "
              f"in {len(normal)} valid states mean {p_end[1:].mean():.3f} (min {p_end[1:].min():.3f}); "
              "the stuck state's top tokens: "
              + ", ".join(f"{tokenizer.decode([int(i)])!r} {float(v):.2f}" for v, i in zip(*top)))


if __name__ == "__main__":
    main()
