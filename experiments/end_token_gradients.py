"""end_token_gradients.py: which part of the actor's loss moves the end token where a run is stuck?

    python experiments/end_token_gradients.py RUN DATASET [OTHER_RUN ...] --action "turn left"

Replays RUN's greedy evaluation (as end_token_probe.py does) for its first stuck state and 8 states where
it wrote `[action] <action>` validly. For each run given, with its final weights, it takes g, the gradient
of log P(end | state, `[action] <action>`) over the LoRA weights, and for each part of the grammar loss (6)
on 4 batches of DATASET (32 turns each, the filter's weights from the run's own final critic):

- `hold_fixed`: log pi(C_j) where the grammar allows one token (the tag, the end token after an action);
- `hold_choice`: log pi(C_j) where it allows several (the action words);
- `choice_w>1` and `choice_w<=1`: f(A) log pi(y_j | C_j), split by the filter's weight,

it prints `-<g, grad part>`: how much one gradient step of unit rate on that part alone would raise
log P(end) in the state (negative: it pushes the end token down there), and the cosine of the two.
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from critic_probe import load_run  # noqa: E402
from end_token_probe import end_probabilities, stuck_and_valid_states  # noqa: E402

import afsft  # noqa: E402
import envs  # noqa: E402


def loss_parts(agent, args, batch):
    """The grammar loss (6) of one batch, split into its four parts (each a scalar; they sum to (6))."""
    inputs, state_mask, tokens, turn_lengths = afsft.encode(
        agent.processor, batch["images"], batch["prompts"], batch["actions"], args.max_new_tokens)
    h = agent.features(inputs, state_mask)
    logits = agent.vlm.get_output_embeddings()(h).float()
    logp = torch.log_softmax(logits, -1)
    with torch.no_grad():
        q = agent.critic(h.float())
        advantage = q.gather(1, tokens[:, None])[:, 0] - afsft.state_values(logits, q, agent.critic.seen)
        valid = torch.repeat_interleave(batch["valid"].float(), turn_lengths)
        weights = afsft.filter_weights(advantage, args.filter, args.beta, args.max_weight,
                                       args.drop_margin) * valid
    turns = torch.split(tokens, turn_lengths.tolist())
    agent.valid_responses |= {tuple(t.tolist()) for t, ok in zip(turns, batch["valid"].tolist()) if ok}
    follows = {}
    for response in agent.valid_responses:
        for j in range(len(response)):
            follows.setdefault(response[:j], set()).add(response[j])
    sets = [sorted(follows.get(tuple(t[:j].tolist()), {int(t[j])})) for t in turns for j in range(len(t))]
    logp_set = torch.stack([logp[i, c].logsumexp(0) for i, c in enumerate(sets)])
    fixed = torch.tensor([len(c) == 1 for c in sets])
    choice = weights * (logp.gather(1, tokens[:, None])[:, 0] - logp_set)
    # (1/l) per turn, then the mean over turns
    scale = torch.repeat_interleave(1.0 / turn_lengths.float(), turn_lengths) / len(turn_lengths)
    return {"hold_fixed": -(scale * valid * logp_set * fixed).sum(),
            "hold_choice": -(scale * valid * logp_set * ~fixed).sum(),
            "choice_w>1": -(scale * choice * ((weights > 1) & ~fixed)).sum(),
            "choice_w<=1": -(scale * choice * ((weights <= 1) & ~fixed)).sum()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="the run whose greedy evaluation is replayed")
    p.add_argument("dataset", help="the run's --offline dataset")
    p.add_argument("others", nargs="*", help="more runs, probed in the same states")
    p.add_argument("--action", default="turn left", help="the whole action the stuck text starts with")
    opt = p.parse_args()
    agent, args, _ = load_run(opt.run)
    response = envs.format_response(opt.action, args.scheme)
    stuck, normal = stuck_and_valid_states(agent, args, response, 50, valid_states=8)
    if not stuck or not normal:
        sys.exit(f"{opt.run}: no invalid turn, or no valid {response!r}, in 50 episodes")
    print(f"{opt.run}: stuck on {stuck[0][2]!r}")
    buffer = afsft.Buffer(envs.load_dataset(opt.dataset)["episodes"], args.gamma)
    rng = np.random.default_rng(0)
    batches = [buffer.sample(rng, 32, args.run_length) for _ in range(4)]
    for run in [opt.run] + opt.others:
        agent = load_run(run)[0]
        lora = [w.requires_grad_(True) for name, w in agent.policy.named_parameters() if "lora_" in name]
        for where, states in (("stuck state", [stuck[0][:2]]), ("valid states", normal)):
            p_end, _ = end_probabilities(agent, states, response)
            g = torch.cat([x.flatten() for x in torch.autograd.grad(p_end.log().mean(), lora)])
            parts = {}
            for batch in batches:
                for name, loss in loss_parts(agent, args, batch).items():
                    grad = torch.autograd.grad(loss, lora, allow_unused=True, retain_graph=True)
                    grad = torch.cat([(x if x is not None else torch.zeros_like(w)).flatten()
                                      for x, w in zip(grad, lora)])
                    parts[name] = parts.get(name, 0) + grad / len(batches)
            print(f"{run}, {where}: P(end) {p_end.mean().item():.3f}, |g| {g.norm():.3g}")
            for name, grad in parts.items():
                change = -(g @ grad).item()
                print(f"  {name:12s} d log P(end) per unit step {change:+.3g}, "
                      f"cos {change / (g.norm() * grad.norm() + 1e-12).item():+.3f}")


if __name__ == "__main__":
    main()
