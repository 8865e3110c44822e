"""drop_probe.py: which of its dataset's tokens does a trained run's filter drop, and could the critic know?

    python experiments/drop_probe.py runs/afsft                  # 600 turns of the run's own dataset
    python experiments/drop_probe.py runs/a runs/b --turns 1000

For every valid turn of a sample of the run's `--offline` dataset it reads, at each response token y_j, the
advantage A = Q(s_j, y_j) - V(s_j) (return std), the policy's pi(y_j | s_j), and the critic's own error
there, |Q(s_j, y_j) - G_t| with G_t the turn's Monte-Carlo return (the target of (4) under --mc-mix 1;
terminated episodes only). Per action word it prints:

- `drop`: the share of its tokens past the margin, A < -m: what the margin alone would drop;
- `spared`: the share past the margin in turns that went on to a positive reward, which
  `--spare-rewarded` (the default since session 40) keeps at the soft weight: `drop - spared` is what the
  default filter drops;
- `drop+err`: the share past a margin widened by the critic's error at that token, A < -(m + |Q - G|)
  (tried as a default in session 27 and not kept: experiments/findings.md);
- `meanA`, `A q05`: the mean and the 5% quantile of A;
- `pi`, `pi@drop`: the mean pi(y_j) over the word's tokens, and over those past the plain margin;
- `|Q-G|`, `@drop`: the critic's error at the word's tokens, and at those past the plain margin.

On expert data every token is the expert's, so whatever this drops is the critic's mistake.
"""
import argparse
import collections
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from critic_probe import load_run  # noqa: E402

import afsft  # noqa: E402
import envs  # noqa: E402


@torch.no_grad()
def token_rows(agent, args, turns, buffer):
    """One dict per response token of the sampled turns: word, A, pi, Q and G (both in return std)."""
    tokenizer, rows = agent.processor.tokenizer, []
    for i in range(0, len(turns), 32):
        batch = buffer.collate(turns[i:i + 32], [])
        inputs, state_mask, tokens, lengths = afsft.encode(agent.processor, batch["images"], batch["prompts"],
                                                           batch["actions"], args.max_new_tokens)
        h = agent.features(inputs, state_mask)
        logits = agent.vlm.get_output_embeddings()(h).float()
        q = agent.critic(h.float())
        q_taken = q.gather(1, tokens[:, None])[:, 0]
        advantage = q_taken - afsft.state_values(logits, q, agent.critic.seen)
        pi = torch.softmax(logits, -1).gather(1, tokens[:, None])[:, 0]
        returns = agent.critic.normalise(batch["returns"])
        turn_of_token = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        for n, k in enumerate(turn_of_token.tolist()):
            if batch["valid"][k] and batch["has_return"][k]:
                rows.append({"word": tokenizer.decode([int(tokens[n])]).strip(), "A": float(advantage[n]),
                             "pi": float(pi[n]), "error": abs(float(q_taken[n] - returns[k])),
                             "rewarded": bool(batch["rewarded_after"][k])})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories written by afsft.py (--out)")
    parser.add_argument("--turns", type=int, default=600, help="dataset turns to read, drawn at random")
    cli = parser.parse_args()
    for run in cli.runs:
        agent, args, step = load_run(run)
        if not args.offline or not os.path.exists(args.offline):
            sys.exit(f"{run}: its dataset {args.offline or '(none)'} is not here")
        buffer = afsft.Buffer(envs.load_dataset(args.offline, args.env)["episodes"], args.gamma)
        turns = [(e, t, False) for e, ep in enumerate(buffer.episodes) for t in range(len(ep["actions"]))]
        np.random.default_rng(0).shuffle(turns)
        by_word = collections.defaultdict(list)
        for row in token_rows(agent, args, turns[:cli.turns], buffer):
            by_word[row["word"]].append(row)
        m = args.drop_margin
        print(f"{run}, step {step}, margin m = {m}: {min(cli.turns, len(turns))} turns of {args.offline}")
        print(f"  {'word':10s} {'n':>5s} {'drop':>6s} {'spared':>6s} {'drop+err':>8s} {'meanA':>7s} "
              f"{'A q05':>7s} {'pi':>6s} {'pi@drop':>7s} {'|Q-G|':>6s} {'@drop':>6s}")
        for word, rows in sorted(by_word.items(), key=lambda item: -len(item[1])):
            a, pi, error, rewarded = (np.array([r[k] for r in rows])
                                      for k in ("A", "pi", "error", "rewarded"))
            if a.min() >= -m:
                continue  # a word the filter never drops: the template, the end token
            drop = a < -m
            print(f"  {word:10s} {len(rows):5d} {drop.mean():6.3f} {(drop & rewarded).mean():6.3f} "
                  f"{(a < -(m + error)).mean():8.3f} "
                  f"{a.mean():+7.3f} {np.quantile(a, 0.05):+7.3f} {pi.mean():6.3f} {pi[drop].mean():7.3f} "
                  f"{error.mean():6.3f} {error[drop].mean():6.3f}")


if __name__ == "__main__":
    main()
