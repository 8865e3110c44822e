"""trunk_probe.py: which loss moves the shared VLM, and does it push the policy out of the syntax?

    python experiments/trunk_probe.py runs/afsft                     # its dataset and its own rollouts
    python experiments/trunk_probe.py runs/a runs/b --episodes 16 --batches 8

The critic's loss (4) and the actor's (5)/(6) both train the LoRA weights of the shared VLM. For batches of
the run's `--offline` dataset, and of episodes the run's policy plays itself at the online temperature (the
turns online rounds add, with the invalid text it samples), this splits the run's own loss into

- `actor`: (6), or (5) under --no-grammar;
- `critic, valid, fixed`, `critic, valid, choice` and `critic, invalid turns`: (4) over the tokens of
  turns the env accepted, where the data's grammar allows one token (the tag, the end token) or a choice
  (the action words), and over the tokens of turns it rejected (the three sum to (4) times --critic-coef);

and prints, per part, the norm of its gradient over the LoRA weights (median over batches) and
`d log pi(C)`: how much one plain gradient step of unit rate on that part alone would raise the mean of
log pi(C_j | s_j) over the valid turns' tokens, C_j the tokens the data's grammar allows after the prefix
(negative: it pushes the policy out of the syntax). The filter is on (no warm-up); nothing is updated.
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from critic_probe import load_run  # noqa: E402

import afsft  # noqa: E402
import envs  # noqa: E402


def loss_parts(agent, args, batch):
    """The run's loss on one batch in its four parts, and the mean log pi(C_j) over valid turns' tokens."""
    seen = {}
    encode, critic_loss = afsft.encode, afsft.critic_loss

    def encode_and_keep(*a, **k):
        encoded = encode(*a, **k)
        if isinstance(encoded, tuple):  # the batch's turns, not a bootstrap prompt
            seen["encoded"] = encoded
        return encoded

    def critic_loss_by_part(q_taken, targets, mask):
        tokens, turn_lengths = seen["encoded"][2:]
        valid = torch.repeat_interleave(batch["valid"], turn_lengths).float()
        sets = afsft.grammar_sets(agent.valid_responses, tokens, turn_lengths)
        fixed = valid * torch.tensor([float(len(c) == 1) for c in sets])
        squares = (q_taken - targets) ** 2 * mask / mask.sum().clamp(min=1)  # (4) is their sum
        seen["critic"] = [(squares * part).sum() for part in (fixed, valid - fixed, 1 - valid)]
        return critic_loss(q_taken, targets, mask)

    afsft.encode, afsft.critic_loss = encode_and_keep, critic_loss_by_part
    try:
        loss, _ = afsft.afsft_loss(agent, batch, args, False, "cpu")
    finally:
        afsft.encode, afsft.critic_loss = encode, critic_loss
    critic_fixed, critic_choice, critic_invalid = (args.critic_coef * c for c in seen["critic"])
    inputs, state_mask, tokens, turn_lengths = seen["encoded"]
    h = agent.features(inputs, state_mask)
    logp = torch.log_softmax(agent.vlm.get_output_embeddings()(h).float(), -1)
    valid = torch.repeat_interleave(batch["valid"], turn_lengths)
    sets = afsft.grammar_sets(agent.valid_responses, tokens, turn_lengths)
    hold = [torch.logsumexp(logp[n, c], 0) for n, c in enumerate(sets) if valid[n]]
    parts = {"actor": loss - critic_fixed - critic_choice - critic_invalid,
             "critic, valid, fixed": critic_fixed, "critic, valid, choice": critic_choice,
             "critic, invalid turns": critic_invalid}
    return parts, torch.stack(hold).mean()


def report(name, agent, args, buffer, batches, rng):
    lora = [p for p in agent.policy.parameters() if p.requires_grad]
    norms, pushes = {}, {}
    for _ in range(batches):
        parts, hold = loss_parts(agent, args, buffer.sample(rng, args.batch_turns, args.run_length))
        g_hold = torch.autograd.grad(hold, lora, retain_graph=True)
        for part, value in parts.items():
            if not value.requires_grad:  # a part with no tokens in this batch
                continue
            g = torch.autograd.grad(value, lora, retain_graph=True, allow_unused=True)
            g = [torch.zeros_like(p) if x is None else x for p, x in zip(lora, g)]
            norms.setdefault(part, []).append(torch.sqrt(sum((x ** 2).sum() for x in g)).item())
            pushes.setdefault(part, []).append(-sum((x * y).sum() for x, y in zip(g, g_hold)).item())
    print(f"  {name}:")
    for part in norms:
        print(f"    {part:22s} |grad| {np.median(norms[part]):9.5f}   "
              f"d log pi(C) {np.median(pushes[part]):+10.6f}   (batches {len(norms[part])})")


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories written by afsft.py (--out)")
    parser.add_argument("--episodes", type=int, default=16, help="episodes the policy plays at temperature 1")
    parser.add_argument("--batches", type=int, default=8, help="batches read from each source")
    cli = parser.parse_args()
    for run in cli.runs:
        agent, args, step = load_run(run)
        rng = np.random.default_rng(0)
        print(f"{run}, step {step}")
        if args.offline and os.path.exists(args.offline):
            dataset = afsft.Buffer(envs.load_dataset(args.offline, args.env)["episodes"], args.gamma)
            report("its dataset", agent.train(), args, dataset, cli.batches, rng)
        own, _ = afsft.run_episodes(agent, args, cli.episodes, args.temperature, "cpu", seed=7 * 10**6)
        report("its own rollouts", agent.train(), args, afsft.Buffer(own, args.gamma), cli.batches, rng)


if __name__ == "__main__":
    main()
