"""critic_probe.py: does a trained run's critic prefer the expert's action where the data disagrees?

    python experiments/critic_probe.py runs/afsft                 # 60 probe episodes
    python experiments/critic_probe.py runs/afsft runs/sft --episodes 300

A `mixed` dataset holds two scripted policies: the expert and the decoy, the env's `suboptimal_action`
(on BabyAI the bot sent to the nearest other object; on Blackjack "hit until 20"). AFSFT can only beat
SFT in the states where they choose differently, so that is where this probe looks. It plays fresh
episodes (seeds that no dataset or evaluation uses), half driven by each bot. In every state it asks
both bots for their action; where they differ, it encodes both responses for the same prompt and
compares them at the first token where they differ (one state s_k, two candidate tokens):

- `Q_E>Q_D`: how often the critic ranks the expert's token above the decoy's;
- `pi_E>pi_D`: how often the policy does (greedy decoding picks the larger);
- `keep E`, `keep D`: how often the binary filter keeps each token, 1[Q(s_k, y) > V(s_k)];
- `dQ`: the mean of Q(s_k, expert) - Q(s_k, decoy), in return std (the critic's units). Where the data
  takes the decoy's token p times as often as the expert's, the exp filter's policy ends at
  pi_E / pi_D = exp(beta dQ) / p, so it prefers the expert's token only if beta dQ > ln p.

A critic that has learned only which action words pay on average (an action prior) scores 1.00 on some
rows and 0.00 on others, whatever the state. Then, with `--linear`, a linear probe asks whether the
trunk's features at the decision position say which of `go` and `turn` the expert chooses (balanced
accuracy on held-out states; 0.5 is chance): if they do not, no linear head on them can.
"""
import argparse
import collections
import dataclasses
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import afsft  # noqa: E402
import envs  # noqa: E402

PROBE_SEED = 5_000_000  # far from collection (seed * 100_003 + i) and evaluation (10**6 + i) seeds


def load_run(run, checkpoint=None):
    """The agent of a run (its `checkpoint/`, or another checkpoint folder of it), its args and its step."""
    checkpoint = checkpoint or os.path.join(run, "checkpoint")
    if not os.path.exists(os.path.join(checkpoint, "state.pt")):
        sys.exit(f"{run}: not a run written by afsft.py (no {checkpoint}/state.pt)")
    state = torch.load(os.path.join(checkpoint, "state.pt"), weights_only=True)
    known = {f.name for f in dataclasses.fields(afsft.Args)}  # runs of other versions may hold other flags
    args = afsft.Args(**{k: v for k, v in state["args"].items() if k in known})
    model = afsft.TINY_BASE if args.model == "tiny" else args.model
    agent = afsft.load_agent(args, model, os.path.join(checkpoint, "policy"))
    agent.critic.load_state_dict(state["critic"], strict=False)  # older runs lack the PopArt buffers
    return agent.eval(), args, state["step"]


def disagreement_states(args, episodes):
    """(image, prompt, expert's action words, decoy's action words) wherever the two bots differ."""
    env = envs.make_env(args.env, text_view=args.text_view, scheme=args.scheme)
    states = []
    for i in range(episodes):
        obs, _ = env.reset(seed=PROBE_SEED + i)
        terminated = truncated = False
        while not (terminated or truncated):
            expert, decoy = (env.action_words[a] for a in (env.expert_action(), env.suboptimal_action()))
            if expert != decoy:
                states.append((obs["image"], obs["prompt"], expert, decoy))
            obs, _, terminated, truncated, _ = env.step(envs.format_response(expert if i % 2 == 0 else decoy,
                                                                             env.scheme))
    return states


@torch.no_grad()
def at_first_difference(agent, args, image, prompt, words):
    """Encode each action's response to the same prompt and read both heads at the first token where the
    responses differ: one state s_k. Returns h, pi, Q and V for every response token, and per response the
    row of its token at s_k and that token's id."""
    responses = [envs.format_response(w, args.scheme) for w in words]
    inputs, state_mask, tokens, lengths = afsft.encode(agent.processor, [image] * len(words),
                                                       [prompt] * len(words), responses, args.max_new_tokens)
    h = agent.features(inputs, state_mask)
    logits = agent.vlm.get_output_embeddings()(h).float()
    pi, q = torch.softmax(logits, -1), agent.critic(h.float())
    starts = [0] + lengths.cumsum(0)[:-1].tolist()
    k = next(j for j in range(int(lengths.min())) if len({int(tokens[s + j]) for s in starts}) > 1)
    rows = [s + k for s in starts]
    return h, pi, q, afsft.state_values(logits, q), rows, [int(tokens[r]) for r in rows]


def compare(agent, args, states):
    rows = collections.defaultdict(lambda: collections.defaultdict(list))
    features = []  # (h at the first differing token, expert says go) for go-vs-turn states
    for image, prompt, expert, decoy in states:
        h, pi, q, v, (i, j), (e, d) = at_first_difference(agent, args, image, prompt, (expert, decoy))
        row = rows[f"{expert} vs {decoy}"]
        row["Q_E>Q_D"].append(q[i, e] > q[i, d])
        row["pi_E>pi_D"].append(pi[i, e] > pi[i, d])
        row["keep E"].append(q[i, e] > v[i])
        row["keep D"].append(q[j, d] > v[j])
        row["dQ"].append(float(q[i, e] - q[i, d]))
        if {expert.split()[0], decoy.split()[0]} == {"go", "turn"}:
            features.append((h[i].numpy(), expert.startswith("go")))
    return rows, features


def linear_probe(features, l2=1e-2):
    """Balanced held-out accuracy of a logistic regression from h to 'the expert says go'."""
    x = torch.tensor(np.array([f for f, _ in features]))
    y = torch.tensor([float(g) for _, g in features])
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = order[: len(y) // 2], order[len(y) // 2:]
    x = (x - x[train].mean(0)) / (x[train].std(0) + 1e-6)
    positive = y[train].mean()
    w, b = torch.zeros(x.shape[1], requires_grad=True), torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=500)
    balance = torch.where(y[train] > 0, 0.5 / positive, 0.5 / (1 - positive))

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x[train] @ w + b, y[train],
                                                                    weight=balance)
        loss = loss + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        said_go, truth = (x[test] @ w + b) > 0, y[test] > 0
        return 0.5 * float((said_go & truth).sum() / truth.sum() + (~said_go & ~truth).sum() / (~truth).sum())


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories written by afsft.py (--out)")
    parser.add_argument("--episodes", type=int, default=60, help="probe episodes, half driven by each bot")
    parser.add_argument("--linear", action="store_true",
                        help="also fit the linear probe on the trunk's features")
    cli = parser.parse_args()
    for run in cli.runs:
        agent, args, step = load_run(run)
        states = disagreement_states(args, cli.episodes)
        rows, features = compare(agent, args, states)
        critic = "" if args.filter != "none" else " (--filter none: the critic head was never trained)"
        print(f"{run}, step {step}: {len(states)} states where expert and decoy disagree{critic}")
        print(f"  {'expert vs decoy':28s}    n  "
              + "  ".join(f"{c:>9s}" for c in ("Q_E>Q_D", "pi_E>pi_D", "keep E", "keep D", "dQ")))
        for kind in sorted(rows):
            cols = rows[kind]
            print(f"  {kind:28s} {len(cols['Q_E>Q_D']):4d}  "
                  + "  ".join(f"{np.mean(v):9.2f}" for v in cols.values()))
        every = {c: np.mean([x for r in rows.values() for x in r[c]]) for c in ("Q_E>Q_D", "pi_E>pi_D")}
        print(f"  all: critic prefers the expert {every['Q_E>Q_D']:.2f}, "
              f"policy prefers the expert {every['pi_E>pi_D']:.2f}")
        if cli.linear and len(features) >= 20:
            print(f"  linear probe, go vs turn from h ({len(features)} states): "
                  f"balanced accuracy {linear_probe(features):.2f}")


if __name__ == "__main__":
    main()
