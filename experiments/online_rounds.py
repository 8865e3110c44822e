"""online_rounds.py: what each online round does to the policy, read at one token position.

    python experiments/online_rounds.py runs/afsft runs/rounds --rounds 4                       # same flags
    python experiments/online_rounds.py runs/afsft runs/rounds --rounds 4 -- --max-weight 1     # flags for the rounds

Copies the offline run RUN to OUT (RUN is never changed) and resumes OUT one online round at a time
(`afsft.py --resume OUT --online-steps k --save-buffer`, then any flags after `--`), keeping each round's
checkpoint. For round k it reads the round's own episodes at response position `--position` (3: the word
after `[action]`, the move in the cards tasks and the first action word in BabyAI). Per token seen there:

- `n`: how many of the round's turns wrote it (sampled at `--temperature`);
- `Q`, `A`, `f(A)`: the critic's value, advantage and filter weight that the round's first update gives it
  (the checkpoint before the round: the model that collected the episodes);
- `p before`, `p after`: the policy's mean probability of it there, before and after the round's updates.

A token whose `f(A)` is far above the others' while `n` is small is one the critic has barely seen. If its
`p after` jumps, one round of imitation moved the policy onto the critic's guess.
"""
import argparse
import collections
import os
import shutil
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
import afsft  # noqa: E402
import envs  # noqa: E402


def load_snapshot(out, k):
    """The agent saved after round k (k = 0: the offline run), its args, and the online episodes so far."""
    folder = os.path.join(out, "rounds", str(k))
    state = torch.load(os.path.join(folder, "state.pt"), weights_only=True)
    args = afsft.Args(**state["args"])
    model = os.path.join(out, "tiny-vlm") if args.model == "tiny" else args.model
    agent = afsft.load_agent(args, model, os.path.join(folder, "policy"))
    agent.critic.load_state_dict(state["critic"])
    buffer = os.path.join(folder, "buffer.pt")
    episodes = envs.load_dataset(buffer)["episodes"] if os.path.exists(buffer) else []
    return agent.eval(), args, episodes


@torch.no_grad()
def read_position(agent, args, episodes, position):
    """Per turn that reaches `position`: (token, Q, A, f(A), pi(token)) there."""
    rows = []
    for ep in episodes:
        for start in range(0, len(ep["actions"]), 16):
            turns = slice(start, start + 16)
            inputs, state_mask, tokens, lengths = afsft.encode(agent.processor, ep["images"][turns].numpy(),
                                                               ep["prompts"][turns], ep["actions"][turns], args.max_new_tokens)
            h = agent.features(inputs, state_mask)
            logits = agent.vlm.get_output_embeddings()(h).float()
            q = agent.critic(h.float())
            advantage = q.gather(1, tokens[:, None])[:, 0] - afsft.state_values(logits, q)
            weight = afsft.filter_weights(advantage, args.filter, args.beta, args.max_weight)
            pi = torch.softmax(logits, -1)
            first = 0
            for length in lengths.tolist():
                if position < length:
                    n = first + position
                    y = int(tokens[n])
                    rows.append((y, q[n, y].item(), advantage[n].item(), weight[n].item(), pi[n, y].item()))
                first += length
    return rows


@torch.no_grad()
def probabilities(agent, args, episodes, position, token_ids):
    """The policy's mean probability of each token at `position` over the same turns."""
    sums, count = torch.zeros(len(token_ids)), 0
    for ep in episodes:
        for start in range(0, len(ep["actions"]), 16):
            turns = slice(start, start + 16)
            inputs, state_mask, _, lengths = afsft.encode(agent.processor, ep["images"][turns].numpy(),
                                                          ep["prompts"][turns], ep["actions"][turns], args.max_new_tokens)
            pi = torch.softmax(agent.vlm.get_output_embeddings()(agent.features(inputs, state_mask)).float(), -1)
            first = 0
            for length in lengths.tolist():
                if position < length:
                    sums += pi[first + position, token_ids]
                    count += 1
                first += length
    return sums / max(count, 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    for k in range(1, opt.rounds + 1):
        command = [sys.executable, os.path.join(HERE, "..", "afsft.py"), "--resume", opt.out, "--online-steps", str(k),
                   "--eval-episodes", str(opt.eval_episodes), "--save-buffer", *flags]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"round {k}: afsft.py failed:\n{done.stderr[-2000:]}")
        shutil.copytree(os.path.join(opt.out, "checkpoint"), os.path.join(opt.out, "rounds", str(k)))
        greedy = done.stdout.strip().splitlines()[-1]

        before, args, seen = load_snapshot(opt.out, k - 1)
        after, _, episodes = load_snapshot(opt.out, k)
        new = episodes[len(seen):]  # the round's own episodes
        rows = read_position(before, args, new, opt.position)
        by_token = collections.defaultdict(list)
        for y, *values in rows:
            by_token[y].append(values)
        ids = sorted(by_token, key=lambda y: -len(by_token[y]))
        p_after = probabilities(after, args, new, opt.position, ids)
        turns = sum(len(ep["actions"]) for ep in new)
        valid = sum(int(ep["valid"].sum()) for ep in new) / max(turns, 1)
        print(f"\nround {k}: {turns} turns sampled, {valid:.2f} valid; greedy after the round: {greedy}")
        print(f"  {'token':>10} {'n':>4} {'Q':>6} {'A':>6} {'f(A)':>6} {'p before':>8} {'p after':>7}")
        for y, p in zip(ids, p_after.tolist()):
            q, a, w, p_before = torch.tensor(by_token[y]).mean(0).tolist()
            name = before.processor.tokenizer.convert_ids_to_tokens([y])[0]
            print(f"  {name!r:>10} {len(by_token[y]):4d} {q:6.2f} {a:+6.2f} {w:6.2f} {p_before:8.2f} {p:7.2f}")


if __name__ == "__main__":
    main()
