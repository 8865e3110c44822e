"""end_token_probe.py: where a run writes invalid text after a whole action, does it still end the turn?

    python experiments/end_token_probe.py RUN [OTHER_RUN ...] --action "turn left"

Replays RUN's greedy evaluation (afsft.py's held-out seeds), takes the first state where it wrote invalid
text, and 20 states where it wrote `[action] <action>` validly. For each run given, it prints the
probability of the end token after the whole response `[action] <action>` in those states, and the top
three next tokens in the stuck state, and after `[action]` alone there (the first action word). An invalid
turn leaves the observation as it was, so one such state under greedy decoding costs a whole episode of
invalid turns.

    python experiments/end_token_probe.py RUN [OTHER_RUN ...] --dataset D --actions "turn left,go forward"

instead asks how rare such states are: for each run, P(end | s, `[action] X`) for each action X given, over
150 valid states of the dataset D (split by whether X is the data's own action there) and over 150 states
of the run's own greedy evaluation (20 episodes); `--data-action done` keeps only the data's states where
it wrote `done`.
"""
import argparse
import os
import random
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from critic_probe import load_run  # noqa: E402

import afsft  # noqa: E402
import envs  # noqa: E402


def end_probabilities(agent, states, response):
    images, prompts = zip(*states)
    inputs, state_mask, _, lengths = afsft.encode(agent.processor, images, prompts, [response] * len(states))
    logits = agent.vlm.get_output_embeddings()(agent.features(inputs, state_mask)).float()
    logp = torch.log_softmax(logits, -1)
    after_response = torch.stack([turn[-1] for turn in torch.split(logp, lengths.tolist())]).exp()
    return after_response[:, afsft.end_token_id(agent.processor)], after_response


def stuck_and_valid_states(agent, args, response, episodes, valid_states=20):
    """Replays the greedy evaluation: the first state where the run wrote invalid text (with that text), and
    up to `valid_states` states where it wrote `response` validly."""
    done, _ = afsft.run_episodes(agent, args, episodes, 0.0, "cpu")
    turns = [(ep["images"][t], ep["prompts"][t], ep["actions"][t], ep["valid"][t])
             for ep in done for t in range(len(ep["actions"]))]
    stuck = [(image, prompt, action) for image, prompt, action, valid in turns if not valid][:1]
    normal = [(image, prompt) for image, prompt, action, valid in turns if valid and action == response]
    return stuck, normal[:valid_states]


def summary(p_end):
    if not len(p_end):
        return "no such state"
    return f"mean {p_end.mean():.3f}, min {p_end.min():.3f}, below 0.5 {(p_end < 0.5).float().mean():.3f}"


def rarity(opt):
    """P(end) after each action over the data's states and the runs' own (see the docstring)."""
    rng = random.Random(0)
    episodes = envs.load_dataset(opt.dataset)["episodes"]
    data = [(envs.turn_image(ep, t), ep["prompts"][t], ep["actions"][t]) for ep in episodes
            for t in range(len(ep["actions"])) if ep["valid"][t]]
    if opt.data_action:  # only the states where the data wrote this action
        data = [turn for turn in data if turn[2] == envs.format_response(opt.data_action)]
    data = rng.sample(data, min(150, len(data)))
    for run in opt.runs:
        agent, args, _ = load_run(run)
        done, _ = afsft.run_episodes(agent, args, 20, 0.0, "cpu")
        own = [(ep["images"][t], ep["prompts"][t]) for ep in done for t in range(len(ep["actions"]))]
        own = rng.sample(own, min(150, len(own)))
        for action in opt.actions.split(","):
            response = envs.format_response(action.strip(), args.scheme)
            with torch.no_grad():
                p_data = end_probabilities(agent, [(image, prompt) for image, prompt, _ in data], response)[0]
                p_own = end_probabilities(agent, own, response)[0]
            mine = torch.tensor([a == response for _, _, a in data])
            print(f"{run}, {response!r}: data states where the data wrote it: {summary(p_data[mine])}; "
                  f"where it wrote another: {summary(p_data[~mine])}; "
                  f"the run's own states: {summary(p_own)}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories written by afsft.py; the first is replayed")
    p.add_argument("--action", default="turn left", help="the whole action the stuck text starts with")
    p.add_argument("--episodes", type=int, default=50, help="evaluation episodes replayed (default: 50)")
    p.add_argument("--dataset", help="instead: how rare such states are, over this dataset's states")
    p.add_argument("--actions", default="turn left,turn right,go forward", help="with --dataset")
    p.add_argument("--data-action", help="with --dataset: only the states where the data wrote this action")
    opt = p.parse_args()
    if opt.dataset:
        return rarity(opt)
    agent, args, _ = load_run(opt.runs[0])
    response = envs.format_response(opt.action, args.scheme)
    stuck, normal = stuck_and_valid_states(agent, args, response, opt.episodes)
    if not stuck or not normal:
        sys.exit(f"{opt.runs[0]}: no invalid turn, or no valid {response!r}, in {opt.episodes} episodes")
    stuck = [(image, prompt) for image, prompt, _ in stuck]
    tokenizer = agent.processor.tokenizer
    for run in opt.runs:
        agent = load_run(run)[0]
        with torch.no_grad():
            p_end, after = end_probabilities(agent, stuck + normal, response)
            # and the choice of the first action word there, after the tag alone
            _, first_word = end_probabilities(agent, stuck, response[: response.index(opt.action)].strip())

        def top(probabilities):
            values, ids = probabilities.topk(3)
            return ", ".join(f"{tokenizer.decode([int(i)])!r} {float(v):.2f}" for v, i in zip(values, ids))
        print(f"{run}: P(end | {response!r}) in the stuck state {p_end[0]:.3f}, "
              f"in {len(normal)} valid states mean {p_end[1:].mean():.3f} (min {p_end[1:].min():.3f}); "
              f"the stuck state's top tokens: {top(after[0])}; its first action word: {top(first_word[0])}")


if __name__ == "__main__":
    main()
