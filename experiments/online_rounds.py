"""online_rounds.py: what each online round does to the policy, read at one token position.

    # same flags
    python experiments/online_rounds.py runs/afsft runs/rounds --rounds 4
    # flags for the rounds
    python experiments/online_rounds.py runs/afsft runs/rounds --rounds 4 -- --max-weight 1

Copies the offline run RUN to OUT (RUN is never changed) and resumes OUT one online round at a time (`afsft.py
--resume OUT --online-rounds k --save-buffer`, then any flags after `--`), keeping each round's checkpoint.
For round k it reads the round's own episodes at response position `--position` (3: the word after `[action]`,
the move in the cards tasks and the first action word in BabyAI). Per token seen there:

- `n`: how many of the round's turns wrote it (sampled at `--temperature`);
- `Q`, `A`, `f(A)`: the critic's value, advantage and filter weight that the round's first update gives it
  (the checkpoint before the round: the model that collected the episodes);
- `p before`, `p after`: the policy's mean probability of it on the turns that wrote it, before and after the
  round's updates.

A token whose `f(A)` is far above the others' while `n` is small is one the critic rates high on little
evidence. If its `p after` jumps, one round of imitation moved the policy onto the critic's guess."""
import argparse
import collections
import os
import shutil
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
from critic_probe import load_run  # noqa: E402

import afsft  # noqa: E402
import envs  # noqa: E402


def load_snapshot(out, k):
    """The agent saved after round k (k = 0: the offline run), its args, and the online episodes so far."""
    folder = os.path.join(out, "rounds", str(k))
    agent, args, _ = load_run(out, folder)
    buffer = os.path.join(folder, "buffer.pt")
    return agent, args, envs.load_dataset(buffer)["episodes"] if os.path.exists(buffer) else []


@torch.no_grad()
def heads_at(agent, args, episodes, position):
    """For every turn whose response reaches `position`: its token there, and the policy's logits and the
    critic's Q over the vocabulary in the state before it."""
    tokens, logits, values = [], [], []
    for ep in episodes:
        for start in range(0, len(ep["actions"]), 16):
            turns = slice(start, start + 16)
            inputs, state_mask, taken, lengths = afsft.encode(agent.processor, ep["images"][turns].numpy(),
                                                              ep["prompts"][turns], ep["actions"][turns],
                                                              args.max_new_tokens)
            h = agent.features(inputs, state_mask)
            first = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
            rows = (first + position)[lengths > position]  # the flattened index of each turn's token there
            tokens.append(taken[rows])
            logits.append(agent.vlm.get_output_embeddings()(h[rows]).float())
            values.append(agent.critic(h[rows].float()))
    return torch.cat(tokens), torch.cat(logits), torch.cat(values)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a finished offline run (afsft.py --out)")
    parser.add_argument("out", help="where the copy is resumed round by round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--position", type=int, default=3, help="response token position to read")
    parser.add_argument("--eval-episodes", type=int, default=20, help="greedy episodes after each round")
    opt, flags = parser.parse_known_args()
    flags = [f for f in flags if f != "--"]
    if not os.path.exists(os.path.join(opt.run, "checkpoint", "state.pt")):
        sys.exit(f"{opt.run}: not a run written by afsft.py (no checkpoint/state.pt)")
    if os.path.exists(opt.out):
        sys.exit(f"{opt.out} exists: pick a new folder")
    shutil.copytree(opt.run, opt.out, ignore=shutil.ignore_patterns("eval.json", "cost.json"))
    shutil.copytree(os.path.join(opt.out, "checkpoint"), os.path.join(opt.out, "rounds", "0"))
    before, _, seen = load_snapshot(opt.out, 0)
    for k in range(1, opt.rounds + 1):
        command = [sys.executable, os.path.join(HERE, "..", "afsft.py"), "--resume", opt.out,
                   "--online-rounds", str(k), "--eval-episodes", str(opt.eval_episodes), "--save-buffer",
                   *flags]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"round {k}: afsft.py failed:\n{done.stderr[-2000:]}")
        shutil.copytree(os.path.join(opt.out, "checkpoint"), os.path.join(opt.out, "rounds", str(k)))
        greedy = done.stdout.strip().splitlines()[-1]

        after, args, episodes = load_snapshot(opt.out, k)  # args: the flags this round ran with
        new = episodes[len(seen):]  # the round's own episodes
        tokens, logits, q = heads_at(before, args, new, opt.position)
        q_taken = q.gather(1, tokens[:, None])[:, 0]
        advantage = q_taken - afsft.state_values(logits, q)  # (1), (2), as the round's first update sees them
        weight = afsft.filter_weights(advantage, args.filter, args.beta, args.max_weight, args.drop_margin)
        p_before = torch.softmax(logits, -1).gather(1, tokens[:, None])[:, 0]
        _, logits_after, _ = heads_at(after, args, new, opt.position)
        p_after = torch.softmax(logits_after, -1).gather(1, tokens[:, None])[:, 0]
        ids = [int(y) for y, _ in collections.Counter(tokens.tolist()).most_common()]
        turns = sum(len(ep["actions"]) for ep in new)
        valid = sum(int(ep["valid"].sum()) for ep in new) / max(turns, 1)
        print(f"\nround {k}: {turns} turns sampled, {valid:.2f} valid; greedy after the round: {greedy}")
        print(f"  {'token':>10} {'n':>4} {'Q':>6} {'A':>6} {'f(A)':>6} {'p before':>8} {'p after':>7}")
        for y in ids:
            at = tokens == y
            name = before.processor.tokenizer.convert_ids_to_tokens([y])[0]
            print(f"  {name!r:>10} {int(at.sum()):4d} {q_taken[at].mean():6.2f} {advantage[at].mean():+6.2f} "
                  f"{weight[at].mean():6.2f} {p_before[at].mean():8.2f} {p_after[at].mean():7.2f}")
        before, seen = after, episodes  # the next round starts from this one's checkpoint


if __name__ == "__main__":
    main()
