"""value_probe.py: is the return readable from the features the critic head sees?

    python experiments/value_probe.py runs/afsft data.pt            # the run's trunk (its LoRA)
    python experiments/value_probe.py runs/afsft data.pt --base     # the pretrained base's trunk

The critic head reads the VLM's last hidden state at each response token. This probe takes those features
for every token of a dataset's terminated episodes (the run's trunk, or the base's), and fits a ridge
regression from them to the Monte-Carlo return G_t of the token's turn on 80% of the episodes. On the
other 20% it reports the correlation of the fit with G_t (`linear`), beside the correlation of the run's
own critic Q(s_j, y_j) with G_t (`critic`). A linear fit far above the critic means the head could read
the return but TD did not teach it; a linear fit near 0 means the features do not hold the return.
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


@torch.no_grad()
def token_features(agent, args, episodes, gamma, batch=32):
    """Per token: the trunk's feature, the critic's Q in return units, its advantage (normalised units), its
    id, G_t of its turn, its episode."""
    turns = [(e, t) for e, ep in enumerate(episodes) for t in range(len(ep["actions"]))]
    feats, q, advantage, ids, returns, owner = [], [], [], [], [], []
    for i in range(0, len(turns), batch):
        chunk = turns[i:i + batch]
        eps = [episodes[e] for e, _ in chunk]
        inputs, state_mask, tokens, lengths = afsft.encode(
            agent.processor, [envs.turn_image(ep, t) for ep, (_, t) in zip(eps, chunk)],
            [ep["prompts"][t] for ep, (_, t) in zip(eps, chunk)],
            [ep["actions"][t] for ep, (_, t) in zip(eps, chunk)], args.max_new_tokens)
        h = agent.features(inputs, state_mask).float()
        feats.append(h)
        q_all = agent.critic(h)
        q_taken = q_all.gather(1, tokens[:, None])[:, 0]
        q.append(agent.critic.to_returns(q_taken))
        logits = agent.vlm.get_output_embeddings()(h).float()
        advantage.append(q_taken - afsft.state_values(logits, q_all, agent.critic.seen))
        ids.append(tokens)
        for (e, t), n in zip(chunk, lengths.tolist()):
            r = episodes[e]["rewards"][t:]
            returns += [float((r * gamma ** torch.arange(len(r))).sum())] * n
            owner += [e] * n
    return (torch.cat(feats).numpy(), torch.cat(q).numpy(), torch.cat(advantage).numpy(),
            torch.cat(ids).numpy(), np.array(returns), np.array(owner))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("dataset")
    p.add_argument("--base", action="store_true", help="the base's features (no LoRA) instead of the run's")
    p.add_argument("--episodes", type=int, default=300)
    p.add_argument("--ridge", type=float, default=1.0)
    opt = p.parse_args()
    agent, args, step = load_run(opt.run)
    if opt.base:
        agent.policy.disable_adapter_layers()
    episodes = [ep for ep in envs.load_dataset(opt.dataset)["episodes"] if ep["terminated"]][:opt.episodes]
    x, q, advantage, ids, g, owner = token_features(agent, args, episodes, args.gamma)
    held_out = owner % 5 == 0
    x1 = np.concatenate([x, np.ones((len(x), 1))], 1)
    a, b = x1[~held_out], g[~held_out]
    w = np.linalg.solve(a.T @ a + opt.ridge * np.eye(a.shape[1]), a.T @ b)
    fit = x1[held_out] @ w
    print(f"{opt.run} (step {step}, {'base' if opt.base else 'run'} features), {len(episodes)} episodes, "
          f"{len(g)} tokens; std of G {g.std():.3f}; held-out correlation with G: "
          f"linear {np.corrcoef(fit, g[held_out])[0, 1]:.3f}, "
          f"critic {np.corrcoef(q[held_out], g[held_out])[0, 1]:.3f}")

    print("advantage (return std units) by token, the 8 most frequent: mean, std, and correlation with G")
    tokenizer = agent.processor.tokenizer
    for token in np.bincount(ids).argsort()[::-1][:8]:
        a = advantage[ids == token]
        corr = np.corrcoef(a, g[ids == token])[0, 1] if a.std() > 0 and g[ids == token].std() > 0 else 0
        print(f"  {tokenizer.decode([int(token)])!r:>14}: n {len(a):5d}  mean {a.mean():+.3f}  "
              f"std {a.std():.3f}  corr {corr:+.3f}")


if __name__ == "__main__":
    main()

