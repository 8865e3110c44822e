"""copy_probe.py: can the tiny base's language model learn to copy a prompt's tag and one of its options?

    python experiments/copy_probe.py                     # 4,000 steps, about 35 minutes on one thread
    python experiments/copy_probe.py --narrow --steps 3000   # tags and options from a small word list
    python experiments/copy_probe.py --tag-is-noun 0.3   # 30% of tags name the list ("Colours", "[colour]")

The prompted base writes no valid action because it never copies the prompt's `[action]` tag or one of the
listed actions (README, "The tiny default model"). Copying a token from the prompt is attention routing
to a few positions (an induction head), and it sits on a plateau. This probe trains only the base's
language model (its config and tokenizer, from scratch, no pictures) on generic instructions in the chat
format, and every --eval-every steps measures, greedy:

- `held_valid`: on held-out instructions that name a tag, the reply is `[tag] option` with the prompt's
  tag and one of its listed options;
- `action_valid`: the same instructions with the tag replaced by `action` and the options by an env's
  action words (neither is ever a tag or an answer in training); `tag_action_valid` and `env_words_valid`
  replace only the tag or only the options;
- per env: the first prompt of 10 held-out episodes, parsed by the env itself (valid or not);
- `p_action`: the probability of `action` right after `[`, and `p_word`: of an action's first token right
  after `[action]`, on those env prompts.

The instructions: "Repeat exactly: <4-23 random tokens>"; a list of options with "Choose X. Reply with the
<noun> only."; and the same list with 'End your reply with "[tag]" followed by exactly one <noun>.', with or
without "Choose X." (without it any option is right). Tags are any token but `action`; options are 1-2
tokens with a leading space; a preamble of 4-39 random words comes first on 70% of samples. `action` is
never a tag and never a preamble word (a word that often stands in the prompt and never is the answer is
one a model learns to avoid). --narrow draws tags and options from the lowercase words of 3+ letters that
are no env's action, and repeats 2-3 options instead of random tokens.
"""
import argparse
import json
import os
import re
import sys
import time

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import envs  # noqa: E402

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tiny_vlm", "base")
ENVS = ["numberline", "ezpoints", "blackjack", "BabyAI-GoToRedBall-v0", "BabyAI-GoToLocal-v0"]
NOUNS = ["option", "choice", "word", "item", "answer", "move", "name", "value"]


def vocabulary(tokenizer, narrow):
    pieces = [tokenizer.decode([i]) for i in range(len(tokenizer))]
    action_words = {w for name in ENVS for a in envs.make_env(name).action_words for w in a.split()}
    if narrow:
        tags = [v for v in pieces if re.fullmatch(r"[a-z]{3,}", v) and v not in action_words | {"action"}]
        options = [v for v in pieces if re.fullmatch(r" [a-z]{3,}", v) and v.strip() not in action_words]
    else:
        tags = [v for v in pieces if not v.startswith("<") and re.fullmatch(r"[^\s\[\]\"',.:]+", v)
                and v != "action"]
        options = [v for v in pieces if not v.startswith("<") and re.fullmatch(r" [^\s\[\]\"',.:]+", v)]
    return {"tags": tags, "options": options,
            "any": [v for v in pieces if not v.startswith("<") and "[action]" not in v],
            "words": [v for v in pieces if re.fullmatch(r" ?[a-z]{2,}", v) and v.strip() != "action"]}


def instruction(rng, vocab, narrow, tag_is_noun=0.0):
    """One (prompt, response) pair of generic instruction following."""
    def option():
        return "".join(rng.choice(vocab["options"], size=rng.integers(1, 3))).strip()

    options = list(dict.fromkeys(option() for _ in range(rng.integers(2, 8))))
    noun = NOUNS[rng.integers(len(NOUNS))]
    tag = "".join(rng.choice(vocab["tags"], size=1 if rng.random() < 0.8 else 2))
    preamble = ""
    if rng.random() < 0.7:
        preamble = "".join(rng.choice(vocab["words"], size=rng.integers(4, 40))).strip().capitalize()
        if rng.random() < 0.5:
            quoted = option()
            preamble += f" '{quoted}' " + "".join(rng.choice(vocab["words"], size=rng.integers(1, 6))).strip()
        preamble += ".\n"
    kind = rng.choice(4, p=[0.4, 0.1, 0.25, 0.25])
    if rng.random() < 0.3:
        noun = str(rng.choice(vocab["tags"])).lower()
    if tag_is_noun and rng.random() < tag_is_noun:  # 'Colours: ...', '"[colour]"', as the envs
        noun = tag
    if kind == 0:
        phrase = (" ".join(options[:3]) if narrow else
                  "".join(rng.choice(vocab["any"], size=rng.integers(4, 24))).strip())
        return f"{preamble}Repeat exactly: {phrase}", phrase
    chosen = options[rng.integers(len(options))]
    rule = preamble + f"{noun.capitalize()}s: {', '.join(options)}.\n"
    if kind == 1:
        return rule + f"Choose {chosen}. Reply with the {noun} only.", chosen
    if kind == 2:
        rule += f"Choose {chosen}. "
    return rule + f'End your reply with "[{tag}]" followed by exactly one {noun}.', f"[{tag}] {chosen}"


def chat(prompt):
    """The base's chat format, with its picture placeholder token (no picture: the language model alone)."""
    return f"<|user|><image>{prompt}<|end|><|assistant|>"


def batch(rng, tokenizer, vocab, narrow, size, tag_is_noun):
    rows = []
    for _ in range(size):
        prompt, response = instruction(rng, vocab, narrow, tag_is_noun)
        head, tail = tokenizer(chat(prompt))["input_ids"], tokenizer(response + "<|end|>")["input_ids"]
        rows.append((head + tail, [-100] * len(head) + tail))
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((size, length), tokenizer.pad_token_id)
    labels, mask = torch.full((size, length), -100), torch.zeros(size, length, dtype=torch.long)
    for b, (ids, target) in enumerate(rows):
        input_ids[b, : len(ids)], labels[b, : len(ids)], mask[b, : len(ids)] = (
            torch.tensor(ids), torch.tensor(target), 1)
    return input_ids, labels, mask


def tagged_reply_is_valid(prompt, reply):
    tag = re.search(r'"\[(.*?)\]"', prompt.split("\n")[-1]).group(1)
    options = prompt.split("\n")[-2].split(": ", 1)[1].rstrip(".").split(", ")  # the line above the rule
    reply = reply.strip()
    return reply.startswith(f"[{tag}] ") and reply[len(tag) + 3:].strip() in options


@torch.no_grad()
def greedy(model, tokenizer, prompts):
    model.eval()
    replies = []
    for prompt in prompts:
        ids = torch.tensor([tokenizer(chat(prompt))["input_ids"]])
        out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        replies.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    model.train()
    return replies


@torch.no_grad()
def next_token_probability(model, tokenizer, text, token_ids):
    model.eval()
    logits = model(torch.tensor([tokenizer(text)["input_ids"]])).logits[0, -1]
    model.train()
    return float(logits.softmax(-1)[list(token_ids)].sum())


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW, 200 warm-up steps, then constant")
    parser.add_argument("--untied", action="store_true", help="a language head of its own (the shipped base)")
    parser.add_argument("--narrow", action="store_true", help="tags and options from a small word list")
    parser.add_argument("--tag-is-noun", type=float, default=0.0,
                        help="the share of tagged instructions whose tag is the list's noun")
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from transformers import AutoConfig, AutoProcessor, LlamaForCausalLM

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    tokenizer = AutoProcessor.from_pretrained(BASE).tokenizer
    config = AutoConfig.from_pretrained(BASE).text_config  # the base's language model, fresh weights
    config.tie_word_embeddings = not args.untied
    model = LlamaForCausalLM(config)
    vocab = vocabulary(tokenizer, args.narrow)
    held = [instruction(np.random.default_rng(10**7 + i), vocab, args.narrow) for i in range(100)]
    held = [prompt for prompt, _ in held if 'End your reply with "[' in prompt]
    as_env, tag_action, env_words = [], [], []  # the same instructions with the env's tag and/or actions
    for i, prompt in enumerate(held):
        words = envs.make_env(ENVS[i % len(ENVS)]).action_words
        lines = prompt.split("\n")
        tag_line = re.sub(r'"\[(.*?)\]"', '"[action]"', lines[-1])
        list_line = lines[-2].split(": ", 1)[0] + f": {', '.join(words)}."
        as_env.append("\n".join(lines[:-2] + [list_line, tag_line]))
        tag_action.append("\n".join(lines[:-1] + [tag_line]))
        env_words.append("\n".join(lines[:-2] + [list_line, lines[-1]]))
    env_prompts = []
    for name in ENVS:
        env = envs.make_env(name)
        for seed in range(10):
            env_prompts.append((name, env, env.reset(seed=envs.EVAL_SEED + seed)[0]["prompt"]))
    action_id = tokenizer.convert_tokens_to_ids("action")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1, (s + 1) / 200))
    start = time.time()
    for step in range(1, args.steps + 1):
        input_ids, labels, mask = batch(rng, tokenizer, vocab, args.narrow, args.batch, args.tag_is_noun)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % args.eval_every:
            continue
        report = {"step": step, "loss": round(loss.item(), 3), "seconds": round(time.time() - start)}
        for key, prompts in (("held_valid", held), ("action_valid", as_env), ("tag_action_valid", tag_action),
                             ("env_words_valid", env_words)):
            replies = greedy(model, tokenizer, prompts)
            report[key] = np.mean([tagged_reply_is_valid(p, r) for p, r in zip(prompts, replies)])
        replies = greedy(model, tokenizer, [prompt for _, _, prompt in env_prompts])
        for name in ENVS:
            report[name] = np.mean([env.parse_env(envs.parse_agent(reply)) is not None
                                    for (n, env, _), reply in zip(env_prompts, replies) if n == name])
        report["p_action"] = np.mean([next_token_probability(model, tokenizer, chat(p) + "[", [action_id])
                                      for _, _, p in env_prompts])
        first_tokens = [{tokenizer(" " + w)["input_ids"][0] for w in env.action_words}
                        for _, env, _ in env_prompts]
        report["p_word"] = np.mean([next_token_probability(model, tokenizer, chat(p) + "[action]", first)
                                    for (_, _, p), first in zip(env_prompts, first_tokens)])
        report["replies"] = replies[::10]
        print(json.dumps({k: round(float(v), 3) if isinstance(v, (float, np.floating)) else v
                          for k, v in report.items()}), flush=True)


if __name__ == "__main__":
    main()
