"""afsft.py: Advantage-Filtered SFT (AFSFT) for vision-language agents, in one file.

The method of "VLM Q-Learning: Aligning Vision-Language Models for Interactive
Decision-Making" (Grigsby, Zhu, Ryoo, Niebles, 2025). A VLM with LoRA adapters
gets a second output head, a critic Q(s, .) over the vocabulary, learned by
TD; the policy imitates only the response tokens whose advantage is positive.
With `--filter none` it is plain SFT. The equations cited as (1)-(5) are
written out in DESIGN.md section 1 and in the README.

    python envs.py collect --env babyai --policy mixed --expert-fraction 0.3 --episodes 300 --out data.pt
    python afsft.py --env babyai --offline data.pt --out runs/afsft
    python afsft.py --env babyai --offline data.pt --out runs/sft --filter none   # the SFT baseline
    torchrun --standalone --nproc_per_node=4 afsft.py --env babyai --offline data.pt --model Qwen/Qwen2-VL-2B-Instruct --dtype bf16
"""
import argparse
import copy
import hashlib
import json
import os
import shutil
import signal
import sys
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

import envs


# --- Args: every hyperparameter is a documented flag. ---------------------------------------------------------------
def flag(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Args:
    env: str = flag("babyai", "short name (babyai, ...) or a full id such as BabyAI-GoToLocal-v0")
    offline: str = flag("", "afsft-v1 dataset that fills the buffer before the offline steps")
    out: str = flag("runs/afsft", "run directory: metrics.jsonl, eval.json, checkpoint/")
    resume: str = flag("", "continue the run saved in this directory, with its flags but those given again")
    model: str = flag("tiny", "'tiny' (built offline) or a hub id / path of an image-text-to-text model")
    finetune: str = flag("auto", "lora: adapters on the language model; full: every weight; auto: full for tiny",
                         choices=["auto", "lora", "full"])
    lora_rank: int = flag(16, "LoRA rank")
    critic_head: str = flag("lowrank", "Q = W_lm h + B(A h) + b with W_lm frozen (lowrank), or a full head",
                            choices=["lowrank", "full"])
    critic_rank: int = flag(32, "rank of the low-rank critic delta")
    critic_init: str = flag("auto", "start the critic's W from the language head (lm) or from zero; auto: lm for a "
                            "pretrained model, zero for tiny, whose random language head says nothing",
                            choices=["auto", "lm", "zero"])
    filter: str = flag("binary", "advantage filter f(A): binary 1[A>0], exp min(exp(beta A), w_max), none = SFT",
                       choices=["binary", "exp", "none"])
    beta: float = flag(1.0, "temperature of the exp filter")
    max_weight: float = flag(20.0, "w_max, the cap of the exp filter")
    sft_warmup: float = flag(0.2, "fraction of the offline steps trained with the filter off")
    gamma: float = flag(0.9, "discount per turn (tokens inside a turn are not discounted)")
    tau: float = flag(0.005, "EMA rate of the target critic head")
    mc_mix: float = flag(0.0, "lambda: every token's target of turn t becomes (1-lambda) TD + lambda G_t, G_t the "
                         "episode's Monte-Carlo return; 0 is pure TD (truncated episodes always use TD)")
    critic_coef: float = flag(1.0, "c in L = L_actor + c L_critic")
    lr: float = flag(1e-3, "AdamW learning rate")
    weight_decay: float = flag(0.0, "AdamW weight decay")
    grad_clip: float = flag(1.0, "max gradient norm")
    batch_turns: int = flag(32, "turns per gradient step")
    run_length: int = flag(8, "consecutive turns of one episode sampled together (they bootstrap each other)")
    offline_steps: int = flag(1000, "gradient steps on the buffer before any interaction")
    online_steps: int = flag(0, "online rounds: collect --rollout-len turns per env, then --updates-per-round steps")
    num_envs: int = flag(8, "environments stepped in parallel (one batched generate per turn)")
    rollout_len: int = flag(16, "turns per env per online round")
    updates_per_round: int = flag(8, "gradient steps per online round")
    temperature: float = flag(1.0, "sampling temperature of online rollouts")
    max_new_tokens: int = flag(24, "longest response, in tokens (longer dataset responses are cut)")
    eval_episodes: int = flag(50, "greedy evaluation episodes at the end")
    eval_every: int = flag(0, "also evaluate every N steps (0: only at the end)")
    eval_temperature: float = flag(0.0, "0 decodes greedily")
    scheme: str = flag("tag", "prompting scheme of the env: [action] tag or JSON", choices=["tag", "json"])
    invalid_penalty: float = flag(0.1, "reward penalty for a response that is not a valid action")
    history: int = flag(0, "list this many recent actions in the prompt")
    text_view: bool = flag(False, "also describe the image in words in the prompt (BabyAI, cards; collect the same way)")
    image_size: int = flag(56, "tiny model: square image side fed to the vision tower")
    seed: int = flag(0, "seed of the model, sampling and environments")
    log_every: int = flag(25, "write a metrics.jsonl line every N steps")
    save_every: int = flag(500, "write the checkpoint every N steps (and at the end)")
    save_buffer: bool = flag(False, "also save the online episodes with the checkpoint")
    device: str = flag("auto", "cpu, cuda, or auto")
    dtype: str = flag("fp32", "VLM weights in bf16 (GPU) or fp32; the critic head and losses stay fp32", choices=["fp32", "bf16"])
    gradient_checkpointing: bool = flag(False, "recompute the VLM's activations in backward: less memory, more time")


def parse_args(argv=None) -> Args:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(Args):
        kind = type(f.default)
        extra = {"action": argparse.BooleanOptionalAction} if kind is bool else {"type": kind}
        parser.add_argument("--" + f.name.replace("_", "-"), default=argparse.SUPPRESS, choices=f.metadata.get("choices"),
                            help=f"{f.metadata['help']} (default: {f.default})", **extra)
    given = vars(parser.parse_args(argv))  # only the flags on the command line
    if given.get("resume"):  # a resumed run keeps its own flags, except those given again
        saved = saved_state(given["resume"], mmap=True)["args"]  # mmap: the flags, not the tensors, are read
        given = {**{f.name: saved[f.name] for f in fields(Args) if f.name in saved}, **given}
    args = Args(**given)
    problems = [name for name, ok in [
        ("--gamma in [0, 1]", 0 <= args.gamma <= 1), ("--tau in (0, 1]", 0 < args.tau <= 1),
        ("--mc-mix in [0, 1]", 0 <= args.mc_mix <= 1), ("--sft-warmup in [0, 1]", 0 <= args.sft_warmup <= 1),
        ("--lr > 0", args.lr > 0), ("--batch-turns, --run-length, --num-envs, --max-new-tokens >= 1",
                                    min(args.batch_turns, args.run_length, args.num_envs, args.max_new_tokens) >= 1),
        ("--offline-steps, --online-steps, --eval-episodes >= 0",
         min(args.offline_steps, args.online_steps, args.eval_episodes) >= 0),
        ("--offline needs a file when --offline-steps > 0", args.offline or args.resume or args.offline_steps == 0),
    ] if not ok]
    if problems:
        parser.error("expected " + "; ".join(problems))
    return args


def fail(message):
    sys.exit(f"afsft.py: error: {message}")


# --- Model: a VLM trunk (LoRA or full), its language head (the policy), a critic head Q(s, .) and its EMA target ----
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{% if m['content'] is string %}{{ m['content'] }}"
                 "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}"
                 "{% endif %}{% endfor %}{% endif %}<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def build_tiny_vlm(corpus, image_size, path):
    """A real LLaVA (SigLIP tower + Llama text model) with a byte-level BPE tokenizer fitted to `corpus`. Random
    weights, nothing downloaded. It is saved to `path`, so that it loads exactly like a pretrained model does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor,
                              PreTrainedTokenizerFast, SiglipVisionConfig)
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<pad>", "<|end|>", "<image>", "<|user|>", "<|assistant|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="<|end|>")
    processor = LlavaProcessor(image_processor=SiglipImageProcessorPil(size={"height": image_size, "width": image_size}),
                               tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="full",
                               chat_template=CHAT_TEMPLATE)
    vision = SiglipVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                                image_size=image_size, patch_size=8)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=192, intermediate_size=512, num_hidden_layers=3,
                       num_attention_heads=4, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id, bos_token_id=None, tie_word_embeddings=False)
    config = LlavaConfig(vision_config=vision, text_config=text, vision_feature_select_strategy="full",
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
                         projector_hidden_act="gelu")
    LlavaForConditionalGeneration(config).save_pretrained(path)
    processor.save_pretrained(path)


def tiny_corpus(env, dataset):
    """Text the tiny tokenizer is fitted to: the env's prompts and actions, and the dataset's."""
    corpus = []
    for seed in range(20):  # action words can depend on the state (MiniWoB's element refs)
        corpus += [env.reset(seed=seed)[0]["prompt"]] + [envs.format_response(a, env.scheme) for a in env.action_words] * 3
    for ep in (dataset or {}).get("episodes", [])[:200]:
        corpus += ep["prompts"][:5] + ep["actions"]
    return corpus


class CriticHead(nn.Module):
    """Q(s, a) for every token a. lowrank: Q = W_lm h + B(A h) + b, with W_lm a frozen copy of the
    language head, so the trainable part is d*r + r*|V| + |V| instead of d*|V| (DESIGN.md section 1)."""

    def __init__(self, lm_head: nn.Linear, kind: str, rank: int, init: str = "lm"):
        super().__init__()
        self.base = nn.Linear(lm_head.in_features, lm_head.out_features, bias=False).requires_grad_(kind == "full")
        self.base.weight.data.copy_(lm_head.weight.data.float() if init == "lm" else 0.0)
        self.down = nn.Linear(lm_head.in_features, rank, bias=False) if kind == "lowrank" else None
        self.up = nn.Linear(rank, lm_head.out_features) if kind == "lowrank" else None
        self.bias = nn.Parameter(torch.zeros(lm_head.out_features))
        if self.up is not None:
            nn.init.zeros_(self.up.weight)  # starts exactly at the language head's logits
            self.up.bias = None

    def forward(self, h):
        q = self.base(h) + self.bias
        return q + self.up(self.down(h)) if self.down is not None else q


class Agent(nn.Module):
    def __init__(self, policy, processor, args: Args):
        super().__init__()
        self.policy, self.processor = policy, processor  # policy: the VLM, peft-wrapped under LoRA
        self.vlm = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
        self.critic = CriticHead(self.vlm.get_output_embeddings(), args.critic_head, args.critic_rank, args.critic_init)
        self.target = copy.deepcopy(self.critic).requires_grad_(False)

    def features(self, inputs, state_mask):
        """Hidden states at the response's states only: heads over the prompt and image tokens would fill the memory."""
        return self.vlm.model(**inputs, use_cache=False).last_hidden_state[state_mask]

    @torch.no_grad()
    def update_target(self, tau):
        for target, online in zip(self.target.parameters(), self.critic.parameters()):
            target.lerp_(online, tau)


def load_agent(args: Args, model_path: str, policy_dir: str = ""):
    """Load a VLM through the Auto classes, add LoRA on its language model (or train it all), and the heads."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(model_path)
    except ImportError as err:  # transformers 5 builds Qwen2-VL's video processor on torchvision
        fail(f"--model {model_path}: {str(err).strip().splitlines()[0]} (pip install torchvision)")
    vlm = AutoModelForImageTextToText.from_pretrained(policy_dir if args.finetune == "full" and policy_dir else model_path,
                                                      dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    if args.gradient_checkpointing:  # non-reentrant: the frozen embeddings need no requires_grad hook
        vlm.activation_checkpointing_enable()
    if args.finetune == "lora":
        vlm.requires_grad_(False)
        if policy_dir:
            vlm = PeftModel.from_pretrained(vlm, policy_dir, is_trainable=True)
        else:  # every linear layer of the language model (the decoder): none of the vision tower, projector, lm_head
            decoder = set(map(id, vlm.get_decoder().modules()))
            names = [n for n, m in vlm.named_modules() if isinstance(m, nn.Linear) and id(m) in decoder]
            vlm = get_peft_model(vlm, LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules=names))
    if args.critic_init == "auto":  # the language head is a useful prior for Q only when it was pretrained
        args.critic_init = "zero" if args.model == "tiny" else "lm"
    return Agent(vlm, processor, args)


# --- Encoding: (image, prompt) through the family's chat template; a response ends in its end-of-turn token ---------
# What differs between VLM families, by processor class. "end": the token closing an assistant turn, which the agent
# learns to write and generation stops at (default: EOS). "prompt": the text format where there is no chat template.
FAMILIES = {
    "LlavaProcessor": {},                                # "USER: <image>\n... ASSISTANT:" then EOS
    "Idefics3Processor": {"end": "<end_of_utterance>"},  # Idefics3 and SmolVLM
    "Qwen2VLProcessor": {"end": "<|im_end|>"},           # ChatML
    "PaliGemmaProcessor": {"prompt": "<image>{}"},       # the processor adds "<bos>" and the "\n" ending the prefix
}


def end_token_id(processor):
    tokenizer = processor.tokenizer
    return tokenizer.convert_tokens_to_ids(FAMILIES.get(type(processor).__name__, {}).get("end", tokenizer.eos_token))


def encode(processor, images, prompts, responses=None, max_response_tokens=24):
    """Model inputs for a batch of turns. Without responses: the prompts, left-padded for `generate`. With them:
    prompt + response + end-of-turn token, right-padded; `state_mask`, the positions whose hidden state predicts a
    response token (the states s_1..s_l of the token-level MDP); the tokens y_1..y_l; and each turn's length l."""
    tokenizer, family = processor.tokenizer, FAMILIES.get(type(processor).__name__, {})
    chats = [family["prompt"].format(p) if "prompt" in family else processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}],
        add_generation_prompt=True, tokenize=False) for p in prompts]
    tokenizer.padding_side = "left" if responses is None else "right"
    bos = tokenizer.bos_token  # a template that writes the BOS itself must not get a second one
    inputs = processor(images=list(images), text=chats, padding=True, return_tensors="pt",
                       add_special_tokens=not (bos and chats[0].startswith(bos)))
    inputs.pop("labels", None)  # PaliGemma's processor adds training labels; the losses build their own
    if responses is None:
        return inputs
    ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    ids = [r[:max_response_tokens - 1] + [end_token_id(processor)] for r in ids]
    prompt_lengths = inputs["attention_mask"].sum(1).tolist()
    width = max(p + len(r) for p, r in zip(prompt_lengths, ids))
    # the per-token inputs grow to the new width. The response is text (mm_token_type_ids 0), and in
    # PaliGemma the suffix (token_type_ids 1): the prompt attends both ways, the response causally.
    after_prompt = {"input_ids": tokenizer.pad_token_id, "attention_mask": 0, "token_type_ids": 1, "mm_token_type_ids": 0}
    grown = {k: torch.full((len(ids), width), v, dtype=inputs[k].dtype) for k, v in after_prompt.items() if k in inputs}
    state_mask = torch.zeros(len(ids), width, dtype=torch.bool)
    for b, (p, r) in enumerate(zip(prompt_lengths, ids)):
        for key, tensor in grown.items():
            tensor[b, :p] = inputs[key][b, :p]
        grown["input_ids"][b, p:p + len(r)] = torch.tensor(r)
        grown["attention_mask"][b, :p + len(r)] = 1
        state_mask[b, p - 1:p - 1 + len(r)] = True  # the state before token j is position p-1+j
    inputs.update(grown)
    return inputs, state_mask, inputs["input_ids"][:, 1:][state_mask[:, :-1]], torch.tensor([len(r) for r in ids])


# --- Buffer: whole episodes in memory, sampled as runs of consecutive turns. ----------------------------------------
class Buffer:
    def __init__(self, episodes=(), gamma=0.9):
        self.episodes, self.gamma = list(episodes), gamma

    def sample(self, rng, batch_turns, run_length):
        """Runs of up to `run_length` consecutive turns, episodes weighted by length. A turn's bootstrap value then
        comes from its successor's forward pass in the same batch; only a run's last turn needs an extra no-grad one."""
        lengths = np.array([len(ep["actions"]) for ep in self.episodes])
        turns, successors = [], []
        while len(turns) < batch_turns:
            e = rng.choice(len(lengths), p=lengths / lengths.sum())
            n = min(run_length, lengths[e], batch_turns - len(turns))
            start = rng.integers(lengths[e] - n + 1)
            turns += [(e, t, t + 1 < start + n) for t in range(start, start + n)]
            if start + n < lengths[e]:
                successors.append((len(turns) - 1, e, start + n))
        return self.collate(turns, successors)

    def collate(self, turns, successors):
        eps = self.episodes
        batch = {key: [eps[e][key][t] for e, t, _ in turns] for key in ("prompts", "actions")}
        batch["images"] = [eps[e]["images"][t].numpy() for e, t, _ in turns]
        batch["rewards"] = torch.stack([eps[e]["rewards"][t] for e, t, _ in turns])
        batch["done"] = torch.tensor([t == len(eps[e]["actions"]) - 1 and eps[e]["terminated"] for e, t, _ in turns])
        # G_t = sum_k gamma^k r_{t+k}, the Monte-Carlo return of the episode's rest; known when it terminated
        batch["returns"] = torch.stack([(eps[e]["rewards"][t:] * self.gamma ** torch.arange(len(eps[e]["rewards"]) - t)).sum()
                                        for e, t, _ in turns])
        batch["has_return"] = torch.tensor([eps[e]["terminated"] for e, _, _ in turns])
        # where turn i's successor value lives: the next turn in the batch, a bootstrap prompt, or nowhere
        batch["next_in_batch"] = torch.tensor([nxt for _, _, nxt in turns])
        batch["boot_of"] = torch.tensor([i for i, _, _ in successors], dtype=torch.long)
        batch["boot_images"] = [eps[e]["images"][t].numpy() for _, e, t in successors]
        batch["boot_prompts"] = [eps[e]["prompts"][t] for _, e, t in successors]
        return batch


# --- Losses: pure functions of tensors. -----------------------------------------------------------------------------
# Token n of the flattened batch is the state s_j of some turn; `is_last` marks j = l, the turn's final token.
def state_values(logits, q):
    """(2) V(s) = sum_a pi(a|s) Q(s, a), the exact expectation over the vocabulary."""
    return (torch.softmax(logits.float(), -1) * q).sum(-1)


def td_targets(v_bar, is_last, reward, gamma, not_done, v_bar_next_turn, mc_return=None, mc_weight=None):
    """(3) Expected-SARSA targets. Inside a turn: Vbar(s_{j+1}), discount 1. At the turn's last token:
    r_t + gamma (1 - done_t) Vbar(s_{t+1,1}). With --mc-mix, every token of turn t is also pulled toward the
    Monte-Carlo return G_t by `mc_weight`. The per-turn tensors hold one value per turn, in turn order."""
    targets = v_bar.roll(-1)
    targets[is_last] = reward + gamma * not_done * v_bar_next_turn
    if mc_return is not None:  # no token-by-token propagation: each state sees its turn's return
        turn_of_token = is_last.long().cumsum(0) - is_last.long()
        targets = torch.lerp(targets, mc_return[turn_of_token], mc_weight[turn_of_token])
    return targets


def critic_loss(q_taken, targets, mask):
    """(4) L_critic = mean_j (Q(s_j, y_j) - target_j)^2 over tokens whose target is known."""
    return ((q_taken - targets) ** 2 * mask).sum() / mask.sum().clamp(min=1)


def filter_weights(advantage, kind, beta=1.0, max_weight=20.0):
    """f(A): binary 1[A > 0], exp min(exp(beta A), w_max), or none (f = 1: SFT)."""
    if kind == "exp":
        return torch.exp(beta * advantage).clamp(max=max_weight)
    return (advantage > 0).float() if kind == "binary" else torch.ones_like(advantage)


def actor_loss(logp_taken, weights, turn_lengths):
    """(5) L_actor = -(1/l) sum_j f(A_j) log pi(y_j|s_j), averaged over turns. Normalising by all
    l tokens (not the kept ones) lets filtered tokens shrink the gradient."""
    per_turn = torch.split(-(weights * logp_taken), turn_lengths.tolist())
    return torch.stack([t.sum() / len(t) for t in per_turn]).mean()


def afsft_loss(agent, batch, args: Args, use_filter: bool, device):
    """The loss of one batch of turns. With --filter none only the first block runs: that is SFT."""
    inputs, state_mask, tokens, turn_lengths = encode(agent.processor, batch["images"], batch["prompts"],
                                                      batch["actions"], args.max_new_tokens)
    h = agent.features(inputs.to(device), state_mask.to(device))
    tokens = tokens.to(device)
    logits = agent.vlm.get_output_embeddings()(h).float()
    logp_taken = torch.log_softmax(logits, -1).gather(1, tokens[:, None])[:, 0]
    if args.filter == "none":
        loss = actor_loss(logp_taken, torch.ones_like(logp_taken), turn_lengths)
        return loss, {"loss": loss.item(), "actor_loss": loss.item()}

    # --- the lines that make SFT into AFSFT -------------------------------------------------
    q = agent.critic(h.float())
    q_taken = q.gather(1, tokens[:, None])[:, 0]
    with torch.no_grad():
        advantage = q_taken - state_values(logits.detach(), q)                       # (1), (2)
        v_bar = state_values(logits.detach(), agent.target(h.detach().float()))      # Vbar, from the EMA head
        is_last, v_next, has_target = next_turn_values(agent, batch, v_bar, turn_lengths, device)
        not_done = (~batch["done"]).float().to(device)
        targets = td_targets(v_bar, is_last, batch["rewards"].to(device), args.gamma, not_done, v_next,  # (3)
                             batch["returns"].to(device), args.mc_mix * batch["has_return"].float().to(device))
    weights = filter_weights(advantage, args.filter, args.beta, args.max_weight) if use_filter \
        else torch.ones_like(advantage)                                              # warm-up: f = 1
    actor, critic = actor_loss(logp_taken, weights, turn_lengths), critic_loss(q_taken, targets, has_target)
    loss = actor + args.critic_coef * critic                                         # (5) + c (4)
    return loss, {"loss": loss.item(), "actor_loss": actor.item(), "critic_loss": critic.item(),
                  "filter_kept": weights.mean().item(), "positive_advantage": (advantage > 0).float().mean().item(),
                  "mean_advantage": advantage.mean().item(),
                  "td_error": ((q_taken - targets).abs() * has_target).sum().item() / has_target.sum().clamp(min=1).item()}


@torch.no_grad()
def next_turn_values(agent, batch, v_bar, turn_lengths, device):
    """Per turn, Vbar(s_{t+1,1}) of the next turn's first state, from the next row of the batch or `bootstrap_values`.
    Also which tokens end a turn, and which have a target (a truncated episode's last turn has no successor)."""
    ends = turn_lengths.cumsum(0).to(device)
    is_last = torch.zeros(int(ends[-1]), dtype=torch.bool, device=device)
    is_last[ends - 1] = True
    in_batch, boot_of = batch["next_in_batch"].to(device), batch["boot_of"].to(device)
    v_next = torch.zeros(len(turn_lengths), device=device)
    v_next[:-1] = torch.where(in_batch[:-1], v_bar[(ends - turn_lengths.to(device))[1:]], 0.0)
    if len(boot_of):
        v_next[boot_of] = bootstrap_values(agent, batch, device)
    known = in_batch | batch["done"].to(device)
    known[boot_of] = True
    has_target = torch.ones_like(v_bar)
    has_target[is_last] = known.float()
    return is_last, v_next, has_target


@torch.no_grad()
def bootstrap_values(agent, batch, device):
    """Vbar at the first state of the turn after each run: one extra no-grad forward over its prompt, the only
    compute AFSFT adds over SFT besides the critic head."""
    inputs = encode(agent.processor, batch["boot_images"], batch["boot_prompts"]).to(device)
    h = agent.vlm.model(**inputs).last_hidden_state[:, -1]  # left-padded: the last prompt token
    return state_values(agent.vlm.get_output_embeddings()(h), agent.target(h.float()))


# --- Rollout: one batched generate per turn over --num-envs environments. -------------------------------------------
@torch.no_grad()
def act(agent, observations, temperature, max_new_tokens, device):
    inputs = encode(agent.processor, [o["image"] for o in observations], [o["prompt"] for o in observations]).to(device)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0} if temperature > 0 else {"do_sample": False}
    tokenizer = agent.processor.tokenizer  # stop at the family's end of turn (or a stray EOS); reuse the KV cache
    out = agent.policy.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, use_cache=True,
                                eos_token_id=[end_token_id(agent.processor), tokenizer.eos_token_id], **sampling)
    return agent.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


class Rollout:
    """--num-envs envs stepped together; finished episodes come out in the afsft-v1 layout."""

    def __init__(self, args: Args, seed: int):
        self.envs = [make(args) for _ in range(args.num_envs)]
        self.seeds = iter(range(seed, 2**31))
        self.episode_seeds = [next(self.seeds) for _ in self.envs]  # each env's open episode was reset with this
        self.obs = [env.reset(seed=s)[0] for env, s in zip(self.envs, self.episode_seeds)]
        self.turns = [[] for _ in self.envs]  # each env's open episode: (image, prompt, action, reward, valid) per turn

    def step(self, agent, args: Args, temperature, device):
        finished = []
        responses = act(agent, self.obs, temperature, args.max_new_tokens, device)
        for i, (env, response) in enumerate(zip(self.envs, responses)):
            image, prompt = torch.tensor(self.obs[i]["image"]), self.obs[i]["prompt"]  # a copy: env images may be read-only
            self.obs[i], reward, terminated, truncated, info = env.step(response)
            self.turns[i].append((image, prompt, response, reward, info["valid"]))
            if terminated or truncated:
                images, prompts, actions, rewards, valid = zip(*self.turns[i])
                finished.append({"images": torch.stack(images), "prompts": list(prompts), "actions": list(actions),
                                 "rewards": torch.tensor(rewards, dtype=torch.float32), "valid": torch.tensor(valid),
                                 "terminated": terminated, "truncated": truncated, "seed": self.episode_seeds[i]})
                self.episode_seeds[i] = next(self.seeds)
                self.obs[i], self.turns[i] = env.reset(seed=self.episode_seeds[i])[0], []
        return finished

    def close(self):
        for env in self.envs:
            env.close()


def make(args: Args):
    return envs.make_env(args.env, scheme=args.scheme, invalid_penalty=args.invalid_penalty, history=args.history,
                         **({"text_view": True} if args.text_view else {}))


def play(agent, args: Args, episodes, temperature, device, seed=10**6):
    """The finished episodes of exactly the seeds seed .. seed+episodes-1, and the env's success test. Not the
    first episodes to finish: those are the short ones, a biased sample."""
    agent.eval()
    rollout, done = Rollout(replace(args, num_envs=min(args.num_envs, episodes)), seed), {}
    while len(done) < episodes:
        for ep in rollout.step(agent, args, temperature, device):
            if ep["seed"] < seed + episodes:
                done[ep["seed"]] = ep
    agent.train()
    rollout.close()
    return list(done.values()), rollout.envs[0].success


def evaluate(agent, args: Args, episodes, device, seed=10**6):
    """Success rate, valid-action rate and mean return over `episodes` episodes on held-out seeds."""
    done, success = play(agent, args, episodes, args.eval_temperature, device, seed)
    returns = [float(ep["rewards"].sum()) for ep in done]
    return {"success_rate": float(np.mean([success(r) for r in returns])),
            "valid_action_rate": float(torch.cat([ep["valid"] for ep in done]).float().mean()),
            "mean_return": float(np.mean(returns)), "episodes": episodes}


# --- Checkpoints: written to a temporary folder, then renamed into place. -------------------------------------------
def save_checkpoint(args, agent, optimizer, step, rng, online_episodes):
    final, tmp = os.path.join(args.out, "checkpoint"), os.path.join(args.out, "checkpoint.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    agent.policy.save_pretrained(os.path.join(tmp, "policy"))
    torch.save({"critic": agent.critic.state_dict(), "target": agent.target.state_dict(), "args": asdict(args),
                "optimizer": optimizer.state_dict(), "step": step,
                "rng": {"torch": torch.get_rng_state(), "numpy": rng.bit_generator.state}}, os.path.join(tmp, "state.pt"))
    if args.save_buffer and online_episodes:  # none yet: a resume goes on without one
        torch.save({"format": envs.DATASET_FORMAT, "env": args.env, "episodes": online_episodes},
                   os.path.join(tmp, "buffer.pt"))
    shutil.rmtree(final + ".old", ignore_errors=True)
    if os.path.exists(final):
        os.replace(final, final + ".old")
    os.replace(tmp, final)
    shutil.rmtree(final + ".old", ignore_errors=True)


def saved_state(run, mmap=False):
    path = os.path.join(run, "checkpoint", "state.pt")
    if not os.path.exists(path):
        fail(f"--resume {run}: no checkpoint at {path}")
    try:
        return torch.load(path, weights_only=True, mmap=mmap)
    except Exception as err:
        fail(f"--resume {run}: unreadable checkpoint ({str(err).splitlines()[0][:200]})")


def load_resume_state(args: Args):
    checkpoint = os.path.join(args.resume, "checkpoint")
    state = saved_state(args.resume)
    saved = state["args"]
    if saved["env"] != args.env or saved["model"] != args.model:
        fail(f"--resume {args.resume}: that run used --env {saved['env']} --model {saved['model']}")
    for key in ("finetune", "critic_head", "critic_rank", "critic_init") + (("image_size",) if args.model == "tiny" else ()):
        setattr(args, key, saved[key])  # the saved weights' shapes, even where given again
    args.out = args.resume
    if args.save_buffer and os.path.exists(os.path.join(checkpoint, "buffer.pt")):
        try:
            state["online_episodes"] = envs.load_dataset(os.path.join(checkpoint, "buffer.pt"))["episodes"]
        except ValueError as err:
            fail(f"--resume {args.resume}: {err}")
    return state


# --- Train loop: offline steps, then online rounds, then evaluation. ------------------------------------------------
def train(args: Args):
    if not args.resume and os.path.exists(os.path.join(args.out, "checkpoint")):  # never overwrite a run
        fail(f"--out {args.out} already holds a run: continue it with --resume {args.out}, or pick another --out")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {args.device}: this torch build sees no CUDA device")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # set by torchrun, nanoGPT-style
    ddp, master = world > 1, rank == 0  # one process per device; rank 0 builds the tiny model, logs, evaluates, saves
    if ddp:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        args.seed += 1000 * rank  # its own environments and batches; the weights are rank 0's (broadcast below)

    def on_all_ranks(flag):  # a decision every rank takes together, or one would wait forever in all_reduce
        flag = torch.tensor(float(bool(flag)), device=device)
        if ddp:
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag)

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    resumed = load_resume_state(args) if args.resume else None
    os.makedirs(args.out, exist_ok=True)  # after the resume, which points --out at the resumed run
    if args.finetune == "auto":
        args.finetune = "full" if args.model == "tiny" else "lora"
    try:
        probe = make(args)
        dataset = envs.load_dataset(args.offline, args.env) if args.offline else None
    except ValueError as err:
        fail(err)
    differs = [f"{k}={v}" for k, v in (dataset or {}).get("options", {}).items() if getattr(args, k, v) != v]
    if differs:  # the policy would be evaluated on prompts of another form than it was trained on
        fail(f"--offline {args.offline} was collected with {', '.join(differs)}; pass the same flags here")
    model_path = os.path.join(args.out, "tiny-vlm") if args.model == "tiny" else args.model
    if args.model == "tiny" and not resumed and master:  # built once per run, then loaded like any saved model
        build_tiny_vlm(tiny_corpus(probe, dataset), args.image_size, model_path)
    if ddp:
        dist.barrier()  # the other ranks load the tiny model once rank 0 has saved it
    policy_dir = os.path.join(args.resume, "checkpoint", "policy") if resumed else ""
    try:
        agent = load_agent(args, model_path, policy_dir).to(device).train()
    except (OSError, ValueError) as err:  # a wrong path or hub id, or a model that is not image-text-to-text
        fail(f"--model {args.model}: cannot load it ({str(err).splitlines()[0][:300]})")
    params = [p for p in agent.parameters() if p.requires_grad]
    if ddp:  # rank 0's random inits (LoRA, critic) for everyone
        for p in [*params, *agent.target.parameters()]:
            dist.broadcast(p.data, 0)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    if master:
        print(f"model {args.model}: {sum(p.numel() for p in agent.policy.parameters()):,} parameters, "
              f"{sum(p.numel() for p in params):,} trainable ({args.finetune}, critic head {args.critic_head})")

    buffer = Buffer(dataset["episodes"][rank::world] if dataset else [], args.gamma)  # each rank trains on its shard
    num_offline, step = len(buffer.episodes), 0  # the buffer's episodes after the first num_offline are online ones
    if resumed:
        for key, part in (("critic", agent.critic), ("target", agent.target), ("optimizer", optimizer)):
            part.load_state_dict(resumed[key])
        for group in optimizer.param_groups:  # the loaded state holds the old run's lr; the flags given win
            group.update(lr=args.lr, weight_decay=args.weight_decay)
        step = resumed["step"]
        if master:  # only rank 0's random streams and online episodes are saved
            torch.set_rng_state(resumed["rng"]["torch"])
            rng.bit_generator.state = resumed["rng"]["numpy"]
            buffer.episodes += resumed.get("online_episodes", [])
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    if master and resumed and os.path.exists(metrics_path):  # forget what was logged after the checkpoint
        with open(metrics_path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        with open(metrics_path, "w") as f:
            f.writelines(kept)
    log = open(metrics_path, "a" if resumed else "w") if master else None
    warmup = int(args.sft_warmup * args.offline_steps)
    total = args.offline_steps + args.online_steps * args.updates_per_round
    rollout = None

    def update(phase):
        nonlocal step
        if ctrl_c:  # raised here, not wherever the signal lands: inside a library's finalizer it would be lost
            raise KeyboardInterrupt
        loss, stats = afsft_loss(agent, buffer.sample(rng, args.batch_turns, args.run_length), args,
                                 use_filter=step >= warmup, device=device)
        optimizer.zero_grad(set_to_none=True)
        if not on_all_ranks(torch.isfinite(loss)):  # never let a NaN reach the weights
            print(f"step {step}: non-finite loss {loss.item()}, batch skipped", file=sys.stderr)
            stats["skipped"] = True
        else:
            loss.backward()
            if ddp:  # average the gradients over the ranks, as DDP does (it would also bucket them)
                for grad in [p.grad for p in params if p.grad is not None]:
                    dist.all_reduce(grad.div_(world))
            stats["grad_norm"] = nn.utils.clip_grad_norm_(params, args.grad_clip).item()
            optimizer.step()
            agent.update_target(args.tau)
        step += 1
        evaluating = args.eval_every and step % args.eval_every == 0
        if master and (step % args.log_every == 0 or step == total or evaluating):
            stats.update(step=step, phase=phase, buffer_turns=sum(len(ep["actions"]) for ep in buffer.episodes))
            if evaluating:
                stats.update(evaluate(agent, args, max(args.eval_episodes // 2, 1), device))
            print(json.dumps(stats), file=log, flush=True)
        if master and step % args.save_every == 0:
            save_checkpoint(args, agent, optimizer, step, rng, buffer.episodes[num_offline:])
        bar.set_postfix({k: round(v, 3) for k, v in stats.items() if isinstance(v, float)})
        bar.update()

    if step < args.offline_steps and not buffer.episodes:
        fail("the buffer is empty: give --offline data.pt, or --offline-steps 0 for a purely online run")
    ctrl_c = []

    def on_ctrl_c(*_):  # the loop stops at its next step and saves; a second Ctrl-C interrupts at once
        ctrl_c.append(True)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous_handler = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        with tqdm(total=total, initial=step, desc="train", dynamic_ncols=True, disable=not master) as bar:
            while step < args.offline_steps:
                update("offline")
            while step < total:
                rollout = rollout or Rollout(args, seed=args.seed * 7919 + step)
                for _ in range(args.rollout_len):
                    buffer.episodes += rollout.step(agent, args, args.temperature, device)
                    if ctrl_c:
                        raise KeyboardInterrupt
                for _ in range(args.updates_per_round):
                    if step < total and on_all_ranks(buffer.episodes):
                        update("online")
    except (KeyboardInterrupt, envs.BrowserDied) as err:  # stop cleanly, keeping what was learned
        if master:
            save_checkpoint(args, agent, optimizer, step, rng, buffer.episodes[num_offline:])
        fail(f"{str(err) or 'interrupted'}; checkpoint saved at step {step}, continue with --resume {args.out}")
    finally:
        signal.signal(signal.SIGINT, previous_handler)
    for env in (probe, rollout):
        if env is not None:
            env.close()
    if ddp:  # gradients were averaged, so every rank ends with the same weights: a line to compare
        digest = hashlib.sha1(b"".join(p.detach().float().cpu().numpy().tobytes() for p in params)).hexdigest()
        print(f"rank {rank}: trainable weights sha1 {digest[:16]}")
        dist.destroy_process_group()
    if not master:
        return {}
    save_checkpoint(args, agent, optimizer, step, rng, buffer.episodes[num_offline:])
    result = evaluate(agent, args, args.eval_episodes, device) if args.eval_episodes else {}
    if result:
        print(json.dumps({"step": step, "phase": "eval", **result}), file=log)
        with open(os.path.join(args.out, "eval.json"), "w") as f:
            json.dump(result, f, indent=2)
        print(json.dumps(result))
    log.close()
    return result


def main(argv=None):
    import transformers

    transformers.logging.disable_progress_bar()  # keep the one progress bar that matters: training
    train(parse_args(argv))


if __name__ == "__main__":
    main()
