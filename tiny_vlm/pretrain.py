"""Pretrain the tiny base VLM that `afsft.py --model tiny` fine-tunes, and save it to tiny_vlm/base.

The paper fine-tunes a *pretrained* VLM: one that can already see and follow instructions, but does not
know the task or its action syntax. This script makes such a model at a size that trains on a CPU:
a real LLaVA (SigLIP vision tower, a 2-layer projector, a Llama language model) with one byte-level BPE
tokenizer for every domain. It learns from what the environments render, never from an env's actions:

- captioning: "Describe the image." answered with what the picture shows, in every domain (NumberLine's
  numbers, the cards' ranks and the formula so far, BabyAI's cell in front and the objects and walls in
  view with their colours and positions);
- generic instruction following in the chat format: repeat a phrase, pick one option from a list, and
  answer with a tag ("[answer] pear"). The options and tags are everyday words, never an env's actions.

    python tiny_vlm/pretrain.py                    # under an hour on 2 cores; writes tiny_vlm/base
    python tiny_vlm/pretrain.py --steps 200 --out /tmp/base --eval-renders 20   # a check of the pipeline

Why the learning rate is 3e-4 with a warm-up, and the image 112x112 in 16x16 patches: see the README's
"The tiny default model". Deterministic from --seed on one machine and thread count. The weights are
stored in float16; the caption accuracy in pretrain_report.json is measured after that round trip.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import envs  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
IMAGE_SIZE, PATCH_SIZE = 112, 16  # 7x7 = 49 image tokens; in BabyAI one patch is exactly one grid cell
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CAPTION_PROMPT = "Describe the image."
BABYAI_LEVELS = ["BabyAI-GoToRedBall-v0", "BabyAI-GoToLocal-v0", "BabyAI-GoToObj-v0",
                 "BabyAI-PickupLoc-v0", "BabyAI-PutNextLocal-v0", "BabyAI-GoToRedBallGrey-v0"]
# Everyday words for the instruction-following tasks. None is an action of any env.
WORDS = ("apple pear plum grape lemon melon cherry peach mango olive tiger horse zebra camel otter eagle "
         "robin whale shark sheep table chair lamp sofa shelf clock piano violin guitar drum river ocean "
         "forest desert valley island bridge tower castle garden winter summer spring autumn morning "
         "evening silver golden wooden paper stone glass happy quiet brave gentle rapid sunny cloudy windy "
         "snowy").split()
TAGS = ["answer", "choice", "option", "pick", "reply", "word"]


# --- What each domain's picture shows, in words -------------------------------------------------------------
def card_name(card):
    return envs.rank_name(card[0])


def numberline_sample(rng):
    env = envs.make_env("numberline", seed=int(rng.integers(2**31)))
    return env.image(), f"Target: {env.target}. Current: {env.position}."


def ezpoints_sample(rng):
    env = envs.make_env("ezpoints", seed=int(rng.integers(2**31)))
    for _ in range(rng.integers(0, 5)):  # a formula part-way built: any tokens, not a policy's moves
        env.formula.append(str(rng.choice(env.action_words[:-1])))
    cards = ", ".join(card_name(c) for c in env.cards)
    return env.image(), f"Cards: {cards}. Formula: {' '.join(env.formula) or 'empty'}."


def blackjack_sample(rng):
    env = envs.make_env("blackjack", seed=int(rng.integers(2**31)))
    for _ in range(rng.integers(0, 4)):
        if envs.hand_total(env.player)[0] < 21:
            env.player.append(env.deal())
    cards = ", ".join(card_name(c) for c in env.player)
    return env.image(), f"Dealer shows {card_name(env.dealer[0])}. Your cards: {cards}."


BABYAI_ENVS = {}


def babyai_sample(rng):
    level = BABYAI_LEVELS[rng.integers(len(BABYAI_LEVELS))]
    env = BABYAI_ENVS.setdefault(level, envs.make_env(level))
    env.reset(seed=int(rng.integers(2**31)))
    # look around: random turns and steps, so that the view is not always the start's
    for _ in range(rng.integers(0, 6)):
        env.inner.step(int(rng.choice([0, 1, 2, 2])))
    return env.image(), env.describe_view()


CAPTIONS = {"numberline": numberline_sample, "ezpoints": ezpoints_sample, "blackjack": blackjack_sample,
            "babyai": babyai_sample}


# --- Generic instruction following (any picture; the answer does not depend on it) --------------------------
def instruction_sample(rng, image):
    words = [str(w) for w in rng.choice(WORDS, size=rng.integers(2, 6), replace=False)]
    kind = rng.integers(3)
    if kind == 0:
        phrase = " ".join(words[:3])
        return image, f"Repeat exactly: {phrase}", phrase
    chosen = words[rng.integers(len(words))]
    rule = f"Options: {', '.join(words)}.\nChoose {chosen}."
    if kind == 1:
        return image, rule + " Reply with the option only.", chosen
    tag = TAGS[rng.integers(len(TAGS))]
    rule += f' End your reply with "[{tag}]" followed by exactly one option.'
    return image, rule, f"[{tag}] {chosen}"


def small(image):
    """The picture at the model's resolution, as its processor would resize it (bicubic): a smaller pool."""
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC))


def make_batch(rng, size, pools):
    """A batch of (image, prompt, response): two thirds captions of every domain, one third instructions."""
    images, prompts, responses = [], [], []
    domains = list(pools)
    for i in range(size):
        image, caption = pools[domains[rng.integers(len(domains))]][rng.integers(len(pools[domains[0]]))]
        if i % 3 != 2:  # two captions for every instruction
            images.append(image), prompts.append(CAPTION_PROMPT), responses.append(caption)
        else:
            image, prompt, response = instruction_sample(rng, image)
            images.append(image), prompts.append(prompt), responses.append(response)
    return images, prompts, responses


# --- The model ----------------------------------------------------------------------------------------------
def tokenizer_corpus(pools):
    corpus = [caption for pool in pools.values() for _, caption in pool[:2000]]
    for name in ["numberline", "ezpoints", "points24", "blackjack"] + BABYAI_LEVELS:
        env = envs.make_env(name)
        for seed in range(30):
            corpus.append(env.reset(seed=seed)[0]["prompt"])
        # the actions' spelling goes into the vocabulary; the model never trains on them
        corpus += [envs.format_response(w) for w in env.action_words] * 2
    corpus += [" ".join(WORDS)] * 5
    corpus += [f'End your reply with "[{t}]" followed by exactly one option.' for t in TAGS]
    corpus += ['Task: Click on the "ok" button. Page elements: [4] button "ok" at x=10..50, y=60..80 '
               "click(ref=N) clicks the element listed as [N]; click(x=X, y=Y) clicks the screenshot's "
               'pixel (X, Y). div id=area class=dialog span "Close" submit cancel yes no previous next '
               "link tab"] * 5
    return corpus


def build(pools, seed):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
        SiglipVisionConfig,
    )
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(tokenizer_corpus(pools), trainers.BpeTrainer(
        vocab_size=1024, special_tokens=["<pad>", "<|end|>", "<image>", "<|user|>", "<|assistant|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="<|end|>")
    processor = LlavaProcessor(
        image_processor=SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer=tokenizer, patch_size=PATCH_SIZE, vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE)
    vision = SiglipVisionConfig(hidden_size=96, intermediate_size=384, num_hidden_layers=2,
                                num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=192, intermediate_size=512, num_hidden_layers=3,
                       num_attention_heads=4, max_position_embeddings=1024, bos_token_id=None,
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                       tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, vision_feature_select_strategy="full",
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
                         projector_hidden_act="gelu")
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config), processor


def encode(processor, images, prompts, responses=None):
    """Chat-formatted inputs; with responses, also the labels (-100 outside the response and its <|end|>)."""
    chats = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}],
        add_generation_prompt=True, tokenize=False) for p in prompts]
    if responses is None:
        processor.tokenizer.padding_side = "left"
        return processor(images=list(images), text=chats, padding=True, return_tensors="pt")
    processor.tokenizer.padding_side = "right"
    prompt_lengths = [len(processor.tokenizer(c)["input_ids"]) for c in chats]
    inputs = processor(images=list(images), text=[c + r + "<|end|>" for c, r in zip(chats, responses)],
                       padding=True, return_tensors="pt")
    labels = inputs["input_ids"].clone()
    for b, n in enumerate(prompt_lengths):  # the image placeholder grows into 49 tokens inside the prompt
        labels[b, : n - 1 + (IMAGE_SIZE // PATCH_SIZE) ** 2] = -100
    labels[inputs["attention_mask"] == 0] = -100
    return inputs, labels


@torch.no_grad()
def caption_accuracy(model, processor, samples, batch=25):
    """Exact-match rate of greedy captions on (image, caption) pairs the model never trained on."""
    model.eval()
    right = 0
    for i in range(0, len(samples), batch):
        images, captions = zip(*samples[i : i + batch])
        inputs = encode(processor, images, [CAPTION_PROMPT] * len(images))
        out = model.generate(**inputs, max_new_tokens=64, do_sample=False,
                             pad_token_id=processor.tokenizer.pad_token_id,
                             eos_token_id=processor.tokenizer.eos_token_id)
        texts = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        right += sum(t.strip() == c for t, c in zip(texts, captions))
    model.train()
    return right / len(samples)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(HERE, "base"), help="where the model is saved")
    parser.add_argument("--steps", type=int, default=3000, help="gradient steps")
    parser.add_argument("--batch", type=int, default=32, help="samples per step")
    parser.add_argument("--lr", type=float, default=3e-4, help="peak AdamW learning rate (1e-3 stays blind)")
    parser.add_argument("--warmup", type=int, default=300, help="linear warm-up steps, then cosine decay")
    parser.add_argument("--pool", type=int, default=3000, help="training renders per domain")
    parser.add_argument("--eval-renders", type=int, default=200, help="held-out renders per domain")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    start = time.time()
    rng = np.random.default_rng(args.seed)
    pools = {name: [(small(image), caption) for image, caption in (sample(rng) for _ in range(args.pool))]
             for name, sample in CAPTIONS.items()}
    held_rng = np.random.default_rng(args.seed + 10**6)  # other seeds: renders never seen in training
    held_out = {name: [sample(held_rng) for _ in range(args.eval_renders)]
                for name, sample in CAPTIONS.items()}
    print(f"renders: {sum(map(len, pools.values()))} for training, {time.time() - start:.0f}s", flush=True)
    model, processor = build(pools, args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1, (s + 1) / args.warmup) * 0.5 * (
        1 + np.cos(np.pi * min(s, args.steps) / args.steps)))
    for step in range(1, args.steps + 1):
        inputs, labels = encode(processor, *make_batch(rng, args.batch, pools))
        hidden = model.model(**inputs).last_hidden_state[:, :-1]
        # position i predicts token i+1; the head runs on the response's positions only
        targets = labels[:, 1:]
        loss = nn.functional.cross_entropy(model.lm_head(hidden[targets != -100]), targets[targets != -100])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == args.steps:
            print(f"step {step} loss {loss.item():.4f} {time.time() - start:.0f}s", flush=True)
    model.to(torch.float16).save_pretrained(args.out)
    processor.save_pretrained(args.out)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    saved = AutoModelForImageTextToText.from_pretrained(args.out, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(args.out)
    report = {name: caption_accuracy(saved, processor, samples) for name, samples in held_out.items()}
    report.update(steps=args.steps, seed=args.seed, minutes=round((time.time() - start) / 60, 1))
    with open(os.path.join(args.out, "pretrain_report.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
