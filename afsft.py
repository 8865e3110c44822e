"""afsft.py: Advantage-Filtered SFT (AFSFT) for vision-language agents, in one file.

The method of "VLM Q-Learning: Aligning Vision-Language Models for Interactive
Decision-Making" (Grigsby, Zhu, Ryoo, Niebles, 2025). A VLM with LoRA adapters
gets a second output head, a critic Q(s, .) over the vocabulary, learned from
TD targets (by default the Monte-Carlo return where the episode ended); the
policy imitates each response token with a weight f(A) of its advantage (by
default min(exp(A), 3), 0 where A < -0.25 unless the turn went
on to a positive reward, and 0 on turns the env rejected; the paper's binary
filter 1[A > 0] is a flag). With `--filter none` it is plain SFT. The
equations cited as (1)-(6) are written out in the README's method section.

The file reads in the order of the method: the flags, the model (VLM, LoRA,
two heads), the encoding of turns, the buffer, the losses, the rollout, one
gradient step, and the train loop.

    python envs.py collect --env babyai --policy mixed --expert-fraction 0.3 --episodes 300 --out data.pt
    python afsft.py --env babyai --offline data.pt --out runs/afsft
    python afsft.py --env babyai --offline data.pt --out runs/sft --filter none   # the SFT baseline
    torchrun --standalone --nproc_per_node=4 afsft.py --env babyai --offline data.pt \\
        --model Qwen/Qwen2-VL-2B-Instruct --dtype bf16
"""

import argparse
import copy
import json
import os
import shutil
import signal
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

import envs


# --- Args: every hyperparameter is a documented flag. -------------------------------------------------------
def flag(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Args:
    # the method: the filter f(A) and the critic's targets (the paper's plain form is below)
    filter: str = flag("exp", "advantage filter f(A): exp min(exp(beta A), w_max) 1[A>-m], binary 1[A>0], "
                       "none = SFT", choices=["exp", "binary", "none"])
    beta: float = flag(1.0, "temperature of the exp filter, on A in units of the return's std (PopArt)")
    max_weight: float = flag(3.0, "w_max, the cap of the exp filter: no token gets more than w_max times "
                             "its SFT weight")
    drop_margin: float = flag(0.25, "m: the exp filter drops a token (f = 0) whose A < -m return std, where "
                              "the critic is sure the policy does better; inside m it stays soft, so noise "
                              "on near-ties cannot drop the expert's token; inf: the plain exp filter")
    spare_rewarded: bool = flag(True, "offline steps: the margin never drops the tokens of a turn from which "
                                "its episode went on to a positive reward: the data shows they can lead to "
                                "success, so a drop there would rest on the critic's word alone; the soft "
                                "weight still ranks them")
    drop_failed: bool = flag(True, "offline steps: the margin also drops the tokens of a turn from which its "
                             "episode never went on to a positive reward, unless the critic is sure they "
                             "beat the policy (A > m): the data testifies against them, so on mixed data the "
                             "filter keeps at least what filtered BC keeps")
    gamma: float = flag(0.9, "discount per turn (tokens inside a turn are not discounted)")
    tau: float = flag(0.005, "EMA rate of the target critic head")
    critic_coef: float = flag(1.0, "c in L = L_actor + c L_critic")
    # what makes the critic robust (the paper's plain form: --filter binary --popart-rate 0 --baseline all
    # --critic-init lm --mc-mix 0 --no-grammar --imitate-invalid --no-skip-unchanged --critic-trunk all
    # --online-critic-trunk all --online-lr 1e-3 --explore 0 --solved-replay 0 --policy-average 0)
    popart_rate: float = flag(3e-3, "EMA rate of the return statistics the critic learns in (PopArt); "
                              "0: the critic learns in reward units")
    baseline: str = flag("seen", "V(s) = sum pi Q over the tokens some batch has held (seen) or over the "
                         "whole vocabulary (all)", choices=["seen", "all"])
    critic_trunk: str = flag("none", "offline steps: which turns' critic loss also trains the shared VLM: "
                             "none (the critic head reads detached features, so the policy's step is "
                             "exactly SFT's whatever the critic's error; the data's witnesses carry the "
                             "filter there), valid (those whose text the env accepted) or all (the paper's)",
                             choices=["valid", "all", "none"])
    online_critic_trunk: str = flag("valid", "--critic-trunk of the online rounds, where the critic decides "
                                    "the filter alone and so must read the state: the features learn what "
                                    "the value needs", choices=["valid", "all", "none"])
    grammar: bool = flag(True, "the actor holds the policy on the tokens that follow each response prefix "
                         "in some valid turn at SFT's strength, and the filter weighs only the choice "
                         "among them (eq. 6); --no-grammar: f(A) weighs every token (eq. 5)")
    imitate_invalid: bool = flag(False, "the actor imitates turns the env rejected as invalid text too (the "
                                 "paper's form); by default it skips them, and the critic still learns "
                                 "their penalty")
    skip_unchanged: bool = flag(True, "the actor skips turns that left the observation as it was (a step "
                                "into a wall), where their exact advantage r - (1 - gamma) V(s) is negative")
    sft_warmup: float = flag(0.2, "fraction of the offline steps trained with the filter off")
    mc_mix: float = flag(1.0, "lambda: each token's target in turn t becomes (1-lambda) TD + lambda G_t, "
                         "G_t the episode's Monte-Carlo return where it terminated (truncated episodes "
                         "use TD); 0 is pure TD, the paper's")
    # the model
    model: str = flag("tiny", "'tiny' (the pretrained base in tiny_vlm/base) or a hub id / path of an "
                      "image-text-to-text model")
    finetune: str = flag("lora", "lora: adapters on the language model; full: every weight",
                         choices=["lora", "full"])
    lora_rank: int = flag(16, "LoRA rank")
    critic_head: str = flag("lowrank", "Q = B(A h) + b, plus W_lm h with W_lm a frozen copy of the language "
                            "head under --critic-init lm (lowrank); or a full trained W h + b",
                            choices=["lowrank", "full"])
    critic_rank: int = flag(32, "rank of the low-rank critic")
    critic_init: str = flag("zero", "start Q at zero, the mean return (zero), or at the language head's "
                            "logits (lm)", choices=["zero", "lm"])
    # optimisation
    lr: float = flag(1e-3, "AdamW learning rate")
    weight_decay: float = flag(0.0, "AdamW weight decay")
    grad_clip: float = flag(1.0, "max gradient norm")
    policy_average: float = flag(0.01, "the policy that is evaluated and saved is an EMA of the trained "
                                 "weights at this rate per step, so about the last 1/rate steps; training "
                                 "never reads it; 0: the last weights")
    batch_turns: int = flag(32, "turns per gradient step")
    run_length: int = flag(8, "consecutive turns of one episode sampled together (they bootstrap each other)")
    offline_steps: int = flag(1000, "gradient steps on the buffer before any interaction")
    # online
    online_rounds: int = flag(0, "online rounds: collect --rollout-len turns per env, then take "
                              "--updates-per-round gradient steps")
    num_envs: int = flag(8, "environments stepped in parallel (one batched generate per turn)")
    rollout_len: int = flag(16, "turns per env per online round")
    updates_per_round: int = flag(8, "gradient steps per online round")
    online_lr: float = flag(3e-4, "AdamW learning rate of the online rounds: the policy starts them near its "
                            "fixed point, and at the offline --lr one round of 8 steps flipped its reading "
                            "of whole blocks of states and back (experiments/findings.md, session 32)")
    temperature: float = flag(1.0, "sampling temperature of online rollouts")
    explore: float = flag(0.1, "share of the online replies the env would reject that are replaced by a "
                          "uniformly random action of its list: without it, a base that writes no valid "
                          "action never gives the actor a turn to imitate")
    solved_replay: float = flag(0.5, "share of each online batch, and offline under --drop-failed, drawn "
                                "from episodes that earned a positive reward: online successes are rare "
                                "early and would otherwise be a vanishing share of a growing buffer "
                                "(self-imitation); offline they are the turns the filter keeps; 0: every "
                                "episode by length")
    max_new_tokens: int = flag(24, "longest response, in tokens (longer dataset responses are cut)")
    # the env and its prompt
    env: str = flag("babyai", "short name (babyai, ...) or a full id such as BabyAI-GoToLocal-v0")
    scheme: str = flag("tag", "prompting scheme of the env: [action] tag or JSON", choices=["tag", "json"])
    invalid_penalty: float = flag(0.1, "reward penalty for a response that is not a valid action")
    history: int = flag(0, "list this many recent actions in the prompt")
    text_view: bool = flag(False, "also describe the image in words in the prompt (BabyAI, cards; collect "
                           "the same way)")
    # the run and its files
    offline: str = flag("", "afsft dataset that fills the buffer before the offline steps")
    out: str = flag("runs/afsft", "run directory: metrics.jsonl, eval.json, checkpoint/")
    resume: str = flag("", "continue the run saved in this directory, with its flags but those given again")
    seed: int = flag(0, "seed of the model, sampling and environments")
    eval_episodes: int = flag(50, "greedy evaluation episodes at the end")
    eval_every: int = flag(0, "also evaluate every N steps, on half the --eval-episodes (0: only at the end)")
    eval_temperature: float = flag(0.0, "0 decodes greedily")
    log_every: int = flag(25, "write a metrics.jsonl line every N steps")
    save_every: int = flag(500, "write the checkpoint every N steps (and at the end)")
    save_buffer: bool = flag(False, "also save the online episodes with the checkpoint")
    # systems
    device: str = flag("auto", "cpu, cuda, or auto")
    dtype: str = flag("fp32", "VLM weights in bf16 (GPU) or fp32; the critic head and losses stay fp32",
                      choices=["fp32", "bf16"])
    gradient_checkpointing: bool = flag(False, "recompute the VLM's activations in backward: less memory, "
                                        "more time")


def check_args(args: Args):
    """The first thing wrong with the flags, or None."""
    try:
        envs.env_id(args.env)
    except ValueError as err:
        return f"--env: {err}"
    if not all(0 <= value <= 1 for value in (args.gamma, args.mc_mix, args.sft_warmup, args.explore,
                                             args.solved_replay)):
        return "--gamma, --mc-mix, --sft-warmup, --explore and --solved-replay must be in [0, 1]"
    if not (0 < args.tau <= 1 and 0 <= min(args.popart_rate, args.policy_average) <= 1 and args.lr > 0
            and args.online_lr > 0):
        return ("--tau must be in (0, 1], --popart-rate and --policy-average in [0, 1], and --lr and "
                "--online-lr > 0")
    if args.drop_margin < 0 or args.max_weight <= 0:
        return "--drop-margin must be >= 0 and --max-weight > 0"
    if min(args.batch_turns, args.run_length, args.num_envs, args.max_new_tokens) < 1:
        return "--batch-turns, --run-length, --num-envs and --max-new-tokens must be >= 1"
    if min(args.offline_steps, args.online_rounds, args.eval_episodes) < 0:
        return "--offline-steps, --online-rounds and --eval-episodes must be >= 0"
    if args.offline_steps > 0 and not (args.offline or args.resume):
        return "--offline needs a dataset when --offline-steps > 0 (--offline-steps 0 trains online only)"
    return None


def fail(message):
    sys.exit(f"afsft.py: error: {message}")


def saved_state(run, mmap=False):
    path = os.path.join(run, "checkpoint", "state.pt")
    if not os.path.exists(path):
        fail(f"--resume {run}: no checkpoint at {path}")
    try:
        return torch.load(path, weights_only=True, mmap=mmap)
    except Exception as err:
        fail(f"--resume {run}: unreadable checkpoint ({str(err).splitlines()[0][:200]})")


def parse_args(argv=None) -> Args:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(Args):
        kind = type(f.default)
        extra = {"action": argparse.BooleanOptionalAction} if kind is bool else {"type": kind}
        parser.add_argument("--" + f.name.replace("_", "-"), default=argparse.SUPPRESS,
                            choices=f.metadata.get("choices"),
                            help=f"{f.metadata['help']} (default: {f.default})", **extra)
    given = vars(parser.parse_args(argv))  # only the flags on the command line
    if given.get("resume"):  # a resumed run keeps its own flags, except those given again
        saved = saved_state(given["resume"], mmap=True)["args"]  # mmap: the flags, not the tensors, are read
        given = {**{f.name: saved[f.name] for f in fields(Args) if f.name in saved}, **given}
    args = Args(**given)
    problem = check_args(args)
    if problem:
        parser.error(problem)
    return args


# --- Model: a VLM trunk (LoRA or full), its language head (the policy), a critic head Q(s, .) -------------
# The default VLM: a tiny LLaVA pretrained on the envs' renders by tiny_vlm/pretrain.py (captions and generic
# instructions, never an env's actions). It can see, but it does not know the tasks or their action syntax.
TINY_BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_vlm", "base")


class CriticHead(nn.Module):
    """Q(s, a) for every token a, in normalised return units: the return is `mean + std * Q` (PopArt), so
    the same --beta and --critic-coef serve rewards of +-1 and of +10. lowrank: Q = B(A h) + b, plus W_lm h
    with W_lm a frozen copy of the language head under --critic-init lm, so the trainable part is
    d*r + r*|V| + |V| instead of d*|V|."""

    def __init__(self, lm_head: nn.Linear, kind: str, rank: int, init: str = "zero"):
        super().__init__()
        d, vocab = lm_head.in_features, lm_head.out_features
        self.base = None  # zero-initialised and frozen it would be |V| x d zeros
        if kind == "full" or init == "lm":
            self.base = nn.Linear(d, vocab, bias=False).requires_grad_(kind == "full")
            self.base.weight.data.copy_(lm_head.weight.data.float() if init == "lm" else 0.0)
        self.down = nn.Linear(d, rank, bias=False) if kind == "lowrank" else None
        self.up = nn.Linear(rank, vocab, bias=False) if kind == "lowrank" else None
        if self.up is not None:
            nn.init.zeros_(self.up.weight)  # starts exactly at zero, or at the language head's logits
        self.bias = nn.Parameter(torch.zeros(vocab))
        # the return statistics (PopArt), and the tokens some batch has held (`state_values`' baseline)
        self.register_buffer("return_mean", torch.tensor(0.0))
        self.register_buffer("return_square", torch.tensor(1.0))
        self.register_buffer("statistics_updates", torch.tensor(0))
        self.register_buffer("seen", torch.zeros(vocab, dtype=torch.bool))

    def forward(self, h):
        q = self.bias + (self.base(h) if self.base is not None else 0.0)
        return q + self.up(self.down(h)) if self.down is not None else q

    def return_std(self):
        return (self.return_square - self.return_mean ** 2).clamp(min=1e-4).sqrt()

    def to_returns(self, q):
        return self.return_mean + self.return_std() * q

    def normalise(self, returns):
        return (returns - self.return_mean) / self.return_std()

    @torch.no_grad()
    def set_statistics(self, mean, square):
        """PopArt's "preserving outputs precisely": new statistics, and the output layer rescaled so that
        every Q in return units stays what it was. Then only the normalised targets move."""
        old_mean, old_std = self.return_mean.clone(), self.return_std()
        self.return_mean.copy_(mean)
        self.return_square.copy_(square)
        for layer in (self.base, self.up):
            if layer is not None:
                layer.weight.mul_(old_std / self.return_std())
        self.bias.mul_(old_std).add_(old_mean - mean).div_(self.return_std())


def sum_over_ranks(tensor):
    """The sum of a tensor over the DDP ranks (itself on one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


class Agent(nn.Module):
    def __init__(self, policy, processor, args: Args):
        super().__init__()
        self.policy, self.processor = policy, processor  # policy: the VLM, peft-wrapped under LoRA
        self.vlm = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
        self.critic = CriticHead(self.vlm.get_output_embeddings(), args.critic_head, args.critic_rank,
                                 args.critic_init)
        self.target = copy.deepcopy(self.critic).requires_grad_(False)
        self.valid_responses = set()  # the token sequences of the valid turns the batches have held

    def features(self, inputs, state_mask):
        """Hidden states at the response's states only: heads over the prompt and image tokens would fill the
        memory."""
        return self.vlm.model(**inputs, use_cache=False).last_hidden_state[state_mask]

    @torch.no_grad()
    def update_target(self, tau):
        for target, online in zip(self.target.parameters(), self.critic.parameters()):
            target.lerp_(online, tau)

    @torch.no_grad()
    def update_return_statistics(self, targets, mask, rate):
        """Move both heads' statistics toward the moments of this batch's targets (where `mask`): a plain
        average over the first 1/rate batches, then an EMA at `rate`. The moments are taken over every
        rank's batch, so the ranks stay identical."""
        sums = sum_over_ranks(torch.stack([(targets * mask).sum(), (targets ** 2 * mask).sum(), mask.sum()]))
        if sums[2] == 0:
            return
        self.critic.statistics_updates += 1
        moments = sums[:2] / sums[2]
        old = torch.stack([self.critic.return_mean, self.critic.return_square])
        mean, square = old.lerp(moments, max(rate, 1 / self.critic.statistics_updates.item()))
        for head in (self.critic, self.target):
            head.set_statistics(mean, square)


def load_agent(args: Args, model_path: str, policy_dir: str = ""):
    """Load a VLM through the Auto classes, add LoRA on its language model (or train it all) and the heads."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(model_path)
    except ImportError as err:  # transformers 5 builds Qwen2-VL's video processor on torchvision
        fail(f"--model {model_path}: {str(err).strip().splitlines()[0]} (pip install torchvision)")
    weights = policy_dir if args.finetune == "full" and policy_dir else model_path
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    vlm = AutoModelForImageTextToText.from_pretrained(weights, dtype=dtype)
    if args.gradient_checkpointing:  # non-reentrant: the frozen embeddings need no requires_grad hook
        vlm.activation_checkpointing_enable()
    if args.finetune == "lora":
        vlm.requires_grad_(False)
        if policy_dir:
            vlm = PeftModel.from_pretrained(vlm, policy_dir, is_trainable=True)
        else:
            # every linear layer of the language model (the decoder) and its language head, none of the
            # vision tower or projector. The head's adapter lets the policy raise tokens the base never wrote
            # (such as `action`): with the head frozen they stayed at 2.5 nats after 500 SFT steps.
            decoder, head = set(map(id, vlm.get_decoder().modules())), vlm.get_output_embeddings()
            names = [n for n, m in vlm.named_modules()
                     if isinstance(m, nn.Linear) and (id(m) in decoder or m is head)]
            lora = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules=names)
            vlm = get_peft_model(vlm, lora)
    return Agent(vlm, processor, args)


# --- Encoding: (image, prompt) in the family's chat template; a response ends in its end-of-turn token ----
# What differs between VLM families, by processor class. "end": the token closing an assistant turn, which
# the agent learns to write and generation stops at (default: EOS). "prompt": the text format where there is
# no chat template (PaliGemma's processor adds "<bos>" and the "\n" ending the prefix).
FAMILIES = {
    "LlavaProcessor": {},                                # "USER: <image>\n... ASSISTANT:" then EOS
    "Idefics3Processor": {"end": "<end_of_utterance>"},  # Idefics3 and SmolVLM
    "Qwen2VLProcessor": {"end": "<|im_end|>"},           # ChatML
    "PaliGemmaProcessor": {"prompt": "<image>{}"},
}


def end_token_id(processor):
    tokenizer = processor.tokenizer
    end = FAMILIES.get(type(processor).__name__, {}).get("end", tokenizer.eos_token)
    return tokenizer.convert_tokens_to_ids(end)


def encode(processor, images, prompts, responses=None, max_response_tokens=24):
    """Model inputs for a batch of turns. Without responses: the prompts, left-padded for `generate`. With
    them: prompt + response + end-of-turn token, right-padded; `state_mask`, the positions whose hidden
    state predicts a response token (the states s_1..s_l of the token-level MDP); the tokens y_1..y_l; and
    each turn's length l."""
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
    # Only the first max_response_tokens tokens are kept, so cut the text first (at 32 characters a token,
    # more than any tokenizer's tokens hold): a dataset's 1 MB response must not stall the tokenizer.
    ids = tokenizer([r[: 32 * max_response_tokens] for r in responses], add_special_tokens=False)["input_ids"]
    ids = [r[:max_response_tokens - 1] + [end_token_id(processor)] for r in ids]
    prompt_lengths = inputs["attention_mask"].sum(1).tolist()
    width = max(p + len(r) for p, r in zip(prompt_lengths, ids))
    # the per-token inputs grow to the new width. The response is text (mm_token_type_ids 0), and in
    # PaliGemma the suffix (token_type_ids 1): the prompt attends both ways, the response causally.
    after_prompt = {"input_ids": tokenizer.pad_token_id, "attention_mask": 0, "token_type_ids": 1,
                    "mm_token_type_ids": 0}
    grown = {k: torch.full((len(ids), width), v, dtype=inputs[k].dtype)
             for k, v in after_prompt.items() if k in inputs}
    state_mask = torch.zeros(len(ids), width, dtype=torch.bool)
    for b, (p, r) in enumerate(zip(prompt_lengths, ids)):
        for key, tensor in grown.items():
            tensor[b, :p] = inputs[key][b, :p]
        grown["input_ids"][b, p:p + len(r)] = torch.tensor(r)
        grown["attention_mask"][b, :p + len(r)] = 1
        state_mask[b, p - 1:p - 1 + len(r)] = True  # the state before token j is position p-1+j
    inputs.update(grown)
    tokens = inputs["input_ids"][:, 1:][state_mask[:, :-1]]
    return inputs, state_mask, tokens, torch.tensor([len(r) for r in ids])


def changed_nothing(episode, t):
    """Whether turn t left the observation as it was: the episode's next turn shows the same image and prompt
    (a step into a wall, and every invalid turn)."""
    return (t + 1 < len(episode["actions"]) and episode["prompts"][t] == episode["prompts"][t + 1]
            and torch.equal(episode["images"][t], episode["images"][t + 1]))


# --- Buffer: whole episodes in memory, sampled as runs of consecutive turns. --------------------------------
class Buffer:
    def __init__(self, episodes=(), gamma=0.9):
        self.episodes, self.gamma = list(episodes), gamma

    def sample(self, rng, batch_turns, run_length, solved_share=0.0):
        """Runs of up to `run_length` consecutive turns, episodes weighted by length; the first `solved_share`
        of the turns come from episodes that earned a positive reward, if any has. A turn's bootstrap value
        then comes from its successor's forward pass in the same batch; only a run's last turn needs an
        extra no-grad one."""
        lengths = np.array([len(ep["actions"]) for ep in self.episodes])
        solved = lengths * np.array([bool((ep["rewards"] > 0).any()) for ep in self.episodes])
        turns, successors = [], []
        while len(turns) < batch_turns:
            pool = solved if solved.any() and len(turns) < solved_share * batch_turns else lengths
            e = rng.choice(len(lengths), p=pool / pool.sum())
            n = min(run_length, lengths[e], batch_turns - len(turns))
            start = rng.integers(lengths[e] - n + 1)
            turns += [(e, t, t + 1 < start + n) for t in range(start, start + n)]
            if start + n < lengths[e]:
                successors.append((len(turns) - 1, e, start + n))
        return self.collate(turns, successors)

    def collate(self, turns, successors):
        eps = self.episodes
        batch = {key: [eps[e][key][t] for e, t, _ in turns] for key in ("prompts", "actions")}
        batch["images"] = [envs.turn_image(eps[e], t) for e, t, _ in turns]
        batch["rewards"] = torch.stack([eps[e]["rewards"][t] for e, t, _ in turns])
        batch["done"] = torch.tensor([t == len(eps[e]["actions"]) - 1 and eps[e]["terminated"]
                                      for e, t, _ in turns])
        # G_t = sum_k gamma^k r_{t+k}, the Monte-Carlo return of the episode's rest; known when it terminated
        batch["returns"] = torch.stack([
            (eps[e]["rewards"][t:] * self.gamma ** torch.arange(len(eps[e]["rewards"]) - t)).sum()
            for e, t, _ in turns])
        batch["has_return"] = torch.tensor([eps[e]["terminated"] for e, _, _ in turns])
        batch["rewarded_after"] = torch.tensor([bool((eps[e]["rewards"][t:] > 0).any()) for e, t, _ in turns])
        batch["failed_after"] = ~batch["rewarded_after"]
        batch["valid"] = torch.tensor([bool(eps[e]["valid"][t]) for e, t, _ in turns])
        batch["unchanged"] = torch.tensor([changed_nothing(eps[e], t) for e, t, _ in turns])
        # where turn i's successor value lives: the next turn in the batch, a bootstrap prompt, or nowhere
        batch["next_in_batch"] = torch.tensor([nxt for _, _, nxt in turns])
        batch["boot_of"] = torch.tensor([i for i, _, _ in successors], dtype=torch.long)
        batch["boot_images"] = [envs.turn_image(eps[e], t) for _, e, t in successors]
        batch["boot_prompts"] = [eps[e]["prompts"][t] for _, e, t in successors]
        return batch


# --- Losses: targets, filter, actor and critic. -------------------------------------------------------------
# Token n of the flattened batch is the state s_j of some turn; `is_last` marks j = l, the turn's final token.
def state_values(logits, q, seen=None):
    """(2) V(s) = sum_a pi(a|s) Q(s, a), the exact expectation over the vocabulary. With `seen`, pi is
    renormalised over the tokens some batch has held: a token the critic never trained on keeps its initial
    Q, which must not move the baseline."""
    if seen is not None:
        logits = logits.masked_fill(~seen, float("-inf"))
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


def filter_weights(advantage, kind, beta=1.0, max_weight=3.0, drop_margin=float("inf"), spared=None,
                   condemned=None):
    """f(A): exp min(exp(beta A), w_max) 1[A > -m], binary 1[A > 0], or none (f = 1: SFT). exp is 1 at
    A = 0, so a token the policy is sure of (where A is near 0, see `afsft_loss`) keeps its SFT weight
    whatever the sign of the critic's noise; binary would drop it half the time. But a soft weight
    alone never overturns a data majority of p to 1 unless beta dQ > ln p (the policy's fixed point is
    pi ∝ mu exp(beta Q)), so past the margin m, where the critic is sure, it drops the token as binary
    does, except where `spared` (a bool per token) says the data vouches for it. Where `condemned` says
    the data testifies against it, the token is dropped unless the critic is sure of the opposite, A > m."""
    if kind == "exp":
        kept = advantage > -drop_margin
        if spared is not None:
            kept = kept | spared
        if condemned is not None:
            kept = kept & (~condemned | (advantage > drop_margin))
        return torch.exp(beta * advantage).clamp(max=max_weight) * kept
    return (advantage > 0).float() if kind == "binary" else torch.ones_like(advantage)


def actor_loss(logp_taken, weights, turn_lengths):
    """(5) L_actor = -(1/l) sum_j f(A_j) log pi(y_j|s_j), averaged over turns. Normalising by all
    l tokens (not the kept ones) lets filtered tokens shrink the gradient."""
    per_turn = torch.split(-(weights * logp_taken), turn_lengths.tolist())
    return torch.stack([t.sum() / len(t) for t in per_turn]).mean()


def grammar_sets(valid_responses, tokens, turn_lengths):
    """C_j for every response token: the tokens that follow its prefix y_<j in some valid response (the
    token itself where none does)."""
    follows = {}  # prefix -> the tokens after it
    for response in valid_responses:
        for j in range(len(response)):
            follows.setdefault(response[:j], set()).add(response[j])
    turns = torch.split(tokens, turn_lengths.tolist())
    return [sorted(follows.get(tuple(t[:j].tolist()), {int(t[j])})) for t in turns for j in range(len(t))]


def grammar_loss(agent, logp, tokens, turn_lengths, weights, valid):
    """(6) L_actor = -(1/l) sum_j [log pi(C_j|s_j) + f(A_j) log pi(y_j|s_j, C_j)], with C_j the tokens that
    follow the prefix y_<j in some valid turn the batches have held, and pi(y|C) = pi(y) / pi(C). With
    f = 1 it is SFT's -log pi(y_j). Where the data's grammar allows one token (the tag, the end token after
    a whole action) pi(y|C) = 1 and the filter has no say; where it allows several (the action words) f
    moves imitation between them but never weakens the hold on the set: in a state where the data's
    majority is wrong, (5) holds the point at a fraction of SFT's weight and the policy drifts to text no
    turn holds (experiments/findings.md)."""
    turns = torch.split(tokens, turn_lengths.tolist())
    agent.valid_responses |= {tuple(t.tolist()) for t, ok in zip(turns, valid.tolist()) if ok}
    sets = grammar_sets(agent.valid_responses, tokens, turn_lengths)
    candidates = torch.zeros(len(sets), max(map(len, sets)), dtype=torch.long)
    for i, c in enumerate(sets):
        candidates[i, : len(c)] = torch.tensor(c)
        candidates[i, len(c):] = c[0]  # padding repeats a member; it is masked below
    in_set = torch.arange(candidates.shape[1])[None] < torch.tensor([len(c) for c in sets])[:, None]
    logp_set = logp.gather(1, candidates.to(logp.device)).masked_fill(~in_set.to(logp.device), float("-inf"))
    logp_set = logp_set.logsumexp(1)
    logp_taken = logp.gather(1, tokens[:, None])[:, 0]
    valid_token = torch.repeat_interleave(valid.float().to(logp.device), turn_lengths.to(logp.device))
    per_token = valid_token * logp_set + weights * (logp_taken - logp_set)
    return actor_loss(per_token, torch.ones_like(per_token), turn_lengths)


@torch.no_grad()
def bootstrap_values(agent, batch, seen, device):
    """Vbar at the first state of the turn after each run, in return units: one extra no-grad forward over
    its prompt, the only compute AFSFT adds over SFT besides the critic head."""
    inputs = encode(agent.processor, batch["boot_images"], batch["boot_prompts"]).to(device)
    h = agent.vlm.model(**inputs).last_hidden_state[:, -1]  # left-padded: the last prompt token
    logits = agent.vlm.get_output_embeddings()(h)
    return agent.target.to_returns(state_values(logits, agent.target(h.float()), seen))


@torch.no_grad()
def next_turn_values(agent, batch, v_bar, turn_lengths, seen, device):
    """Per turn, Vbar(s_{t+1,1}) of the next turn's first state, from the next row of the batch or
    `bootstrap_values`. Also which tokens end a turn, and which have a target (a truncated episode's last
    turn has no successor)."""
    ends = turn_lengths.cumsum(0).to(device)
    is_last = torch.zeros(int(ends[-1]), dtype=torch.bool, device=device)
    is_last[ends - 1] = True
    in_batch, boot_of = batch["next_in_batch"].to(device), batch["boot_of"].to(device)
    v_next = torch.zeros(len(turn_lengths), device=device)
    v_next[:-1] = torch.where(in_batch[:-1], v_bar[(ends - turn_lengths.to(device))[1:]], 0.0)
    if len(boot_of):
        v_next[boot_of] = bootstrap_values(agent, batch, seen, device)
    known = in_batch | batch["done"].to(device)
    known[boot_of] = True
    has_target = torch.ones_like(v_bar)
    has_target[is_last] = known.float()
    return is_last, v_next, has_target


def critic_health(advantage, tokens, turn_lengths, q_returns, batch, weights, device):
    """What shows the critic is healthy: how much of SFT's gradient the filter keeps, the mean advantage at
    syntax tokens (those in more than half the batch's responses: the template, the end token) and at the
    others (the decisions), and the Pearson correlation of Q(s_j, y_j) with the Monte-Carlo return G_t of
    its turn, over turns whose episode terminated."""
    turn_of_token = torch.repeat_interleave(torch.arange(len(turn_lengths), device=device),
                                            turn_lengths.to(device))
    in_response = torch.zeros(len(turn_lengths), int(tokens.max()) + 1, device=device)
    in_response[turn_of_token, tokens] = 1.0
    syntax = in_response.mean(0)[tokens] > 0.5
    stats = {"critic/kept": weights.clamp(max=1).mean().item()}
    for name, where in (("syntax", syntax), ("decision", ~syntax)):
        stats[f"critic/advantage_{name}"] = advantage[where].mean().item() if where.any() else float("nan")
    has_return = batch["has_return"].to(device)[turn_of_token]
    pair = torch.stack([q_returns[has_return], batch["returns"].to(device)[turn_of_token][has_return]])
    if pair.shape[1] > 2 and pair.std(1).min() > 0:
        stats["critic/mc_correlation"] = torch.corrcoef(pair)[0, 1].item()
    return stats


def afsft_loss(agent, batch, args: Args, warmup: bool, device):
    """The loss of one batch of turns. With --filter none only the first block runs: that is SFT.
    During the filter's warm-up the critic learns but f = 1, so the policy's loss is SFT's."""
    inputs, state_mask, tokens, turn_lengths = encode(agent.processor, batch["images"], batch["prompts"],
                                                      batch["actions"], args.max_new_tokens)
    h = agent.features(inputs.to(device), state_mask.to(device))
    tokens = tokens.to(device)
    logits = agent.vlm.get_output_embeddings()(h).float()
    logp = torch.log_softmax(logits, -1)
    logp_taken = logp.gather(1, tokens[:, None])[:, 0]
    if args.filter == "none":
        loss = actor_loss(logp_taken, torch.ones_like(logp_taken), turn_lengths)
        return loss, {"losses/total": loss.item(), "losses/actor": loss.item()}

    # --- the lines that make SFT into AFSFT -------------------------------------------------
    # Offline the critic head reads detached features (--critic-trunk none): its error cannot move the
    # policy at all, and there the data's witnesses (below) carry the filter, so its gradient in the trunk
    # only competed with imitation (GoToRedBall mixed-0.1: 0.53 with it, 0.65 without). Online the critic
    # decides alone and must read the state, so its loss trains the trunk too (--online-critic-trunk
    # valid), in normalised units, so its gradient is on the actor's scale; detached there, its correlation
    # with the return fell to about 0. Not from text the env rejected: it shares its prefixes with the
    # syntax (`[action] turn`, then the end token), and fitting its penalty moved the features there.
    moves_trunk = {"all": torch.ones_like(batch["valid"]), "valid": batch["valid"],
                   "none": torch.zeros_like(batch["valid"])}[args.critic_trunk]
    moves_trunk = torch.repeat_interleave(moves_trunk, turn_lengths).to(device)[:, None]
    h_critic = torch.where(moves_trunk, h, h.detach()).float()
    agent.critic.seen[tokens] = True  # the tokens some batch has held, on any rank: the baseline of (2)
    agent.critic.seen |= sum_over_ranks(agent.critic.seen.float()) > 0
    seen = agent.critic.seen if args.baseline == "seen" else None
    policy_logits = logits.detach()
    with torch.no_grad():  # (3), in return units
        v_bar = agent.target.to_returns(state_values(policy_logits, agent.target(h_critic), seen))  # EMA head
        is_last, v_next, has_target = next_turn_values(agent, batch, v_bar, turn_lengths, seen, device)
        not_done = (~batch["done"]).float().to(device)
        mc_weight = args.mc_mix * batch["has_return"].float().to(device)
        targets = td_targets(v_bar, is_last, batch["rewards"].to(device), args.gamma, not_done, v_next,
                             batch["returns"].to(device), mc_weight)
        if args.popart_rate > 0:
            agent.update_return_statistics(targets, has_target, args.popart_rate)
    q = agent.critic(h_critic)
    q_taken = q.gather(1, tokens[:, None])[:, 0]
    # (1), (2) in units of the return's std. Where the policy is sure of y, A = (1 - pi(y)) (Q(y) - mean Q
    # of the rest) is near 0, and the exp filter keeps SFT's weight.
    advantage = (q_taken - state_values(policy_logits, q, seen)).detach()
    # The margin's drop is a hard verdict, so it takes a second witness: the data. A turn from which its own
    # episode went on to a positive reward is spared (it keeps the soft weight). The drop exists to overturn
    # a majority whose episodes fail; it still does. But on expert data, in states the critic cannot read,
    # Q of the token the expert did not write is an action prior (the expert turns near its goal, so `turn`
    # looks better than `go`), and without this the margin dropped a quarter of the expert's `go` tokens.
    # The witness also speaks against: a turn from which its episode never went on to a positive reward is
    # dropped unless the critic is sure it beats the policy (A > m). On mixed data most of those are the
    # non-expert's, and a soft weight capped at w_max cannot overturn its majority of about 7 to 1 (see
    # `filter_weights`): keeping only the successful episodes ("filtered BC") beat the critic alone on every
    # seed of BabyAI's mixed-0.1 rows (experiments/findings.md, session 48). The critic still ranks the
    # kept tokens, and can keep a failed episode's move it is sure of (random data).
    # Online the agent's own samples hold the alternatives, and its first successes are random walks that
    # vouch for little, so there the critic decides alone (`train_step`).
    spared = torch.repeat_interleave(batch["rewarded_after"] & args.spare_rewarded, turn_lengths).to(device)
    condemned = torch.repeat_interleave(batch["failed_after"] & args.drop_failed, turn_lengths).to(device)
    weights = torch.ones_like(advantage) if warmup else filter_weights(
        advantage, args.filter, args.beta, args.max_weight, args.drop_margin, spared, condemned)
    if not args.imitate_invalid:
        # Text the env rejected earns -p and leaves the state as it was: Q = -p + gamma V(s), so its exact A
        # = -p - (1 - gamma) V(s) is negative wherever V(s) > -p / (1 - gamma). The critic only learns it
        # roughly (about -0.5 return std: past the margin, but a spared turn keeps exp's 0.6), so the actor
        # takes the sign from the env.
        valid_token = torch.repeat_interleave(batch["valid"].float(), turn_lengths).to(device)
        weights = weights * valid_token
    if args.skip_unchanged:
        # A turn that left the observation as it was (a step into a wall) earned r_t and is back in s, so
        # Q = r_t + gamma V(s) exactly and A = r_t - (1 - gamma) V(s): below zero wherever r_t < (1 - gamma)
        # V(s). It is one discount, under the returns' noise, so the critic cannot see it; the env can.
        first_state = turn_lengths.cumsum(0).to(device) - turn_lengths.to(device)
        wasted = batch["unchanged"].to(device) & (batch["rewards"].to(device)
                                                  < (1 - args.gamma) * v_bar[first_state])
        weights = weights * torch.repeat_interleave((~wasted).float(), turn_lengths.to(device))
    if args.grammar:
        valid = batch["valid"] | torch.tensor(args.imitate_invalid)
        actor = grammar_loss(agent, logp, tokens, turn_lengths, weights, valid)
    else:
        actor = actor_loss(logp_taken, weights, turn_lengths)
    critic = critic_loss(q_taken, agent.critic.normalise(targets), has_target)  # (4), normalised
    loss = actor + args.critic_coef * critic  # (6), or (5) with --no-grammar, + c (4)
    q_returns = agent.critic.to_returns(q_taken.detach())
    td_error = ((q_returns - targets).abs() * has_target).sum() / has_target.sum().clamp(min=1)
    return loss, {"losses/total": loss.item(), "losses/actor": actor.item(), "losses/critic": critic.item(),
                  "critic/td_error": td_error.item(), "critic/return_std": agent.critic.return_std().item(),
                  **critic_health(advantage, tokens, turn_lengths, q_returns, batch, weights, device)}


# --- Rollout: one batched generate per turn over --num-envs environments. -----------------------------------
@torch.no_grad()
def generate(agent, images, prompts, temperature, max_new_tokens, device):
    """The agent's responses to a batch of (image, prompt): one batched generate, greedy at temperature 0."""
    inputs = encode(agent.processor, images, prompts).to(device)
    sampling = {"do_sample": False}
    if temperature > 0:
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0}
    # stop at the family's end of turn (or a stray EOS); reuse the KV cache
    tokenizer = agent.processor.tokenizer
    stop = [end_token_id(agent.processor), tokenizer.eos_token_id]
    out = agent.policy.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                use_cache=True, eos_token_id=stop, **sampling)
    return agent.processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def make_env(args: Args):
    return envs.make_env(args.env, scheme=args.scheme, invalid_penalty=args.invalid_penalty,
                         history=args.history, **({"text_view": True} if args.text_view else {}))


class Rollout:
    """--num-envs envs stepped together; finished episodes come out in the dataset's episode layout."""

    def __init__(self, args: Args, seed: int, held_out=False):
        self.envs = [make_env(args) for _ in range(args.num_envs)]
        # episode seeds seed, seed + 1, ...; a rollout that trains skips the evaluation's (envs.training_seed)
        self.seeds = iter(range(seed, 2**31)) if held_out else map(envs.training_seed, range(seed, 2**31))
        # each env's open episode was reset with this
        self.episode_seeds = [next(self.seeds) for _ in self.envs]
        self.obs = [env.reset(seed=s)[0] for env, s in zip(self.envs, self.episode_seeds)]
        self.rng = np.random.default_rng(seed)  # its own stream: the envs' draws stay as without exploring
        # each open episode: (image, prompt, action, reward, valid) per turn
        self.turns = [[] for _ in self.envs]

    def step(self, agent, args: Args, temperature, device, explore=0.0):
        """One turn in every env; returns the episodes that this turn finished. A reply the env would reject
        is, with probability `explore`, replaced by a random action of its list, written as its parser reads
        it: epsilon-greedy exploration, only where the policy has no action to offer."""
        finished = []
        images, prompts = [o["image"] for o in self.obs], [o["prompt"] for o in self.obs]
        responses = generate(agent, images, prompts, temperature, args.max_new_tokens, device)
        for i, (env, response) in enumerate(zip(self.envs, responses)):
            rejected = explore and env.parse_env(envs.parse_agent(response, args.scheme)) is None
            if rejected and self.rng.random() < explore and env.action_words:  # a page can list none
                response = envs.format_response(str(self.rng.choice(env.action_words)), args.scheme)
            # a copy: env images may be read-only
            image, prompt = torch.tensor(self.obs[i]["image"]), self.obs[i]["prompt"]
            self.obs[i], reward, terminated, truncated, info = env.step(response)
            self.turns[i].append((image, prompt, response, reward, info["valid"]))
            if terminated or truncated:
                images, prompts, actions, rewards, valid = zip(*self.turns[i])
                finished.append({
                    "images": torch.stack(images), "prompts": list(prompts), "actions": list(actions),
                    "rewards": torch.tensor(rewards, dtype=torch.float32), "valid": torch.tensor(valid),
                    "terminated": terminated, "truncated": truncated, "seed": self.episode_seeds[i]})
                self.episode_seeds[i] = next(self.seeds)
                self.obs[i], self.turns[i] = env.reset(seed=self.episode_seeds[i])[0], []
        return finished

    def close(self):
        for env in self.envs:
            env.close()


def run_episodes(agent, args: Args, episodes, temperature, device, seed=envs.EVAL_SEED):
    """The finished episodes of exactly the seeds seed .. seed+episodes-1, and the env's success test. Not the
    first episodes to finish: those are the short ones, a biased sample."""
    agent.eval()
    rollout, done = Rollout(replace(args, num_envs=min(args.num_envs, episodes)), seed, held_out=True), {}
    while len(done) < episodes:
        for ep in rollout.step(agent, args, temperature, device):
            if ep["seed"] < seed + episodes:
                done[ep["seed"]] = ep
    agent.train()
    rollout.close()
    return list(done.values()), rollout.envs[0].success


def episode_stats(done, success):
    """Success rate, valid-action rate and mean return of finished episodes. An invalid turn leaves the state
    as it was, so a greedy policy that writes one repeats it to the time limit: one such episode in 50 can
    take the per-turn rate to 0.8, and the share of episodes with no invalid turn tells the two apart."""
    returns = [float(ep["rewards"].sum()) for ep in done]
    return {"success_rate": float(np.mean([success(r) for r in returns])),
            "valid_action_rate": float(torch.cat([ep["valid"] for ep in done]).float().mean()),
            "valid_episode_rate": float(np.mean([bool(ep["valid"].all()) for ep in done])),
            "mean_return": float(np.mean(returns)), "episodes": len(done)}


def evaluate(agent, args: Args, episodes, device, seed=envs.EVAL_SEED):
    """episode_stats of `episodes` episodes on held-out seeds: no dataset or online rollout plays them."""
    return episode_stats(*run_episodes(agent, args, episodes, args.eval_temperature, device, seed))


# --- One gradient step --------------------------------------------------------------------------------------
def on_all_ranks(condition, device, world):
    """A decision every rank takes together, or one would wait forever in all_reduce."""
    agreed = torch.tensor(float(bool(condition)), device=device)
    if world > 1:
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
    return bool(agreed)


def gradient_step(agent, optimizer, batch, args: Args, warmup: bool, device, world=1):
    """One update on one batch: the loss, backward, the gradients averaged over the ranks, clipping, the
    optimizer step and the target head's EMA. Returns the loss's statistics."""
    loss, stats = afsft_loss(agent, batch, args, warmup, device)
    optimizer.zero_grad(set_to_none=True)
    if not on_all_ranks(torch.isfinite(loss), device, world):  # never let a NaN reach the weights
        print(f"non-finite loss {loss.item()}, batch skipped", file=sys.stderr)
        return {**stats, "charts/skipped": True}
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if world > 1:  # average the gradients over the ranks, as DDP does (it would also bucket them)
        for grad in [p.grad for p in params if p.grad is not None]:
            dist.all_reduce(grad.div_(world))
    # one clip per head: a large critic gradient must not shrink the policy's step
    critic = [p for p in agent.critic.parameters() if p.requires_grad]
    critic_ids = set(map(id, critic))
    policy = [p for p in params if id(p) not in critic_ids]
    stats["charts/grad_norm"] = nn.utils.clip_grad_norm_(policy, args.grad_clip).item()
    if args.filter != "none":
        stats["charts/critic_grad_norm"] = nn.utils.clip_grad_norm_(critic, args.grad_clip).item()
    optimizer.step()
    agent.update_target(args.tau)
    return stats


class PolicyAverage:
    """The policy that is evaluated and saved: an average of the trained weights of the VLM (its adapters
    under LoRA), their plain mean over the first 1/rate steps, then an EMA at `rate` (Polyak averaging).
    The learner trains, acts online and resumes with its own weights; the average never feeds back. Why:
    late in training the last weights can break the syntax in one state, and the greedy policy then repeats
    that turn to the time limit (3 of 36 offline runs); the average over about the last 1/rate steps did not
    in any of them (experiments/findings.md, sessions 44-45)."""

    def __init__(self, vlm, rate):
        self.trained = {name: p for name, p in vlm.named_parameters() if p.requires_grad} if rate else {}
        self.average = {name: p.detach().clone() for name, p in self.trained.items()}
        self.rate, self.updates = rate, 0

    @torch.no_grad()
    def update(self):
        self.updates += 1
        for name, p in self.trained.items():
            self.average[name].lerp_(p, max(self.rate, 1 / self.updates))

    @contextmanager
    def in_place(self):
        """The average in the trained weights' place (to evaluate or save it), then the trained weights
        back."""
        trained = {name: p.detach().clone() for name, p in self.trained.items()}
        with torch.no_grad():
            for name, p in self.trained.items():
                p.copy_(self.average[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.trained.items():
                    p.copy_(trained[name])


# --- A run's state, and its checkpoint (written to a temporary folder, then renamed into place) -------------
@dataclass
class Run:
    """What `setup` builds and the train loop advances."""

    agent: nn.Module
    optimizer: torch.optim.Optimizer
    average: PolicyAverage
    buffer: Buffer
    rng: np.random.Generator
    device: torch.device
    rank: int = 0
    world: int = 1
    step: int = 0
    # the buffer's first episodes are the dataset's; those after them were collected online
    num_offline: int = 0
    log: object = None  # metrics.jsonl, open on rank 0
    interrupted: bool = False  # set by Ctrl-C; the loop stops at its next step and saves
    # online episodes finished since the last metrics line (the rollouts' own success and valid-action rate)
    new_episodes: list = field(default_factory=list)
    success: object = None  # the env's success test of an episode's return

    @property
    def master(self):  # rank 0 logs, evaluates and saves
        return self.rank == 0


def save_checkpoint(args: Args, run: Run):
    final, tmp = os.path.join(args.out, "checkpoint"), os.path.join(args.out, "checkpoint.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # policy/ is the policy that is evaluated, the average; the trained weights go to state.pt, for --resume.
    # With LoRA the adapters only: the language head's own weights are frozen, so they are not saved again
    with run.average.in_place():
        run.agent.policy.save_pretrained(os.path.join(tmp, "policy"), save_embedding_layers=False)
    trained = {name: p.detach() for name, p in run.average.trained.items()}
    torch.save({"critic": run.agent.critic.state_dict(), "target": run.agent.target.state_dict(),
                "trained_policy": trained, "average_updates": run.average.updates,
                "valid_responses": sorted(run.agent.valid_responses),  # the grammar of (6) so far
                "args": asdict(args), "optimizer": run.optimizer.state_dict(), "step": run.step,
                "rng": {"torch": torch.get_rng_state(), "numpy": run.rng.bit_generator.state}},
               os.path.join(tmp, "state.pt"))
    online_episodes = run.buffer.episodes[run.num_offline:]
    if args.save_buffer and online_episodes:  # none yet: a resume goes on without one
        envs.save_dataset(os.path.join(tmp, "buffer.pt"), args.env, online_episodes)
    shutil.rmtree(final + ".old", ignore_errors=True)
    if os.path.exists(final):
        os.replace(final, final + ".old")
    os.replace(tmp, final)
    shutil.rmtree(final + ".old", ignore_errors=True)


def total_steps(args: Args):
    return args.offline_steps + args.online_rounds * args.updates_per_round


def load_resume_state(args: Args):
    checkpoint = os.path.join(args.resume, "checkpoint")
    state = saved_state(args.resume)
    saved = state["args"]
    if not envs.same_env(saved["env"], args.env) or saved["model"] != args.model:
        fail(f"--resume {args.resume}: that run used --env {saved['env']} --model {saved['model']}")
    for key in ("finetune", "critic_head", "critic_rank", "critic_init"):
        setattr(args, key, saved[key])  # the saved weights' shapes, even where given again
    args.out = args.resume
    if state["step"] >= total_steps(args) and os.path.exists(os.path.join(args.out, "eval.json")):
        print(f"--resume {args.out}: the run is finished ({state['step']} steps, evaluated in eval.json); "
              "to train it further, raise --offline-steps or --online-rounds", file=sys.stderr)
        sys.exit(0)
    if args.save_buffer and os.path.exists(os.path.join(checkpoint, "buffer.pt")):
        try:
            state["online_episodes"] = envs.load_dataset(os.path.join(checkpoint, "buffer.pt"))["episodes"]
        except ValueError as err:
            fail(f"--resume {args.resume}: {err}")
    return state


def restore(run: Run, resumed: dict, args: Args):
    """Continue a saved run: the heads, the policy's trained weights and their average, the optimizer, the
    step, the grammar of (6) the batches have held, and rank 0's random streams and online episodes."""
    try:
        run.agent.critic.load_state_dict(resumed["critic"])
        run.agent.target.load_state_dict(resumed["target"])
    except RuntimeError as err:  # a checkpoint of an afsft.py whose critic head differs
        fail(f"--resume {args.resume}: its critic head does not fit this afsft.py "
             f"({str(err).splitlines()[0]})")
    # the model was loaded from policy/, so run.average (built from it) goes on from the saved average; the
    # learner goes on from its own weights
    run.average.updates = resumed.get("average_updates", 0)
    trained = resumed.get("trained_policy", {})  # none in a checkpoint of an afsft.py before the average
    with torch.no_grad():
        for name, p in run.agent.vlm.named_parameters():
            if name in trained:
                p.copy_(trained[name])
    run.optimizer.load_state_dict(resumed["optimizer"])
    for group in run.optimizer.param_groups:  # the loaded state holds the old run's lr; the flags given win
        group.update(lr=args.lr, weight_decay=args.weight_decay)
    run.step = resumed["step"]
    run.agent.valid_responses = set(map(tuple, resumed.get("valid_responses", [])))
    if run.master:
        torch.set_rng_state(resumed["rng"]["torch"])
        run.rng.bit_generator.state = resumed["rng"]["numpy"]
        run.buffer.episodes += resumed.get("online_episodes", [])


# --- Setup: everything before the first step ----------------------------------------------------------------
def setup_device(args: Args):
    """The device, and under torchrun (as nanoGPT does it) this process's rank and the number of ranks."""
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {args.device}: this torch build sees no CUDA device")
    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:  # one process per device
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        args.seed += 1000 * rank  # its own environments and batches; the weights are rank 0's (broadcast)
    return device, rank, world


def load_data(args: Args):
    """The env, checked by making one, and the dataset, validated against it (None without --offline)."""
    try:
        make_env(args).close()
        dataset = envs.load_dataset(args.offline, args.env) if args.offline else None
    except (ValueError, envs.MissingDependency) as err:
        fail(err)
    differs = [f"{k}={v}" for k, v in (dataset or {}).get("options", {}).items() if getattr(args, k, v) != v]
    if differs:  # the policy would be evaluated on prompts of another form than it was trained on
        fail(f"--offline {args.offline} was collected with {', '.join(differs)}; pass the same flags here")
    return dataset


def build_agent(args: Args, resumed, device, world):
    """The agent (a resumed run's weights, if any) and its optimizer; under DDP every rank starts from rank
    0's."""
    policy_dir = os.path.join(args.resume, "checkpoint", "policy") if resumed else ""
    try:
        agent = load_agent(args, TINY_BASE if args.model == "tiny" else args.model, policy_dir)
    except (OSError, ValueError) as err:  # a wrong path or hub id, or a model that is not image-text-to-text
        fail(f"--model {args.model}: cannot load it ({str(err).splitlines()[0][:300]})")
    agent.to(device).train()
    params = [p for p in agent.parameters() if p.requires_grad]
    if world > 1:
        for p in [*params, *agent.target.parameters()]:
            dist.broadcast(p.data, 0)
    return agent, torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)


def open_log(args: Args, resumed):
    """metrics.jsonl; a resumed run forgets what was logged after its checkpoint."""
    path = os.path.join(args.out, "metrics.jsonl")
    if resumed and os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resumed["step"]]
        with open(path, "w") as f:
            f.writelines(kept)
    return open(path, "a" if resumed else "w")


def setup(args: Args) -> Run:
    """The device, the data, the agent and its optimizer, and a resumed run's state. Every check of the input
    comes before --out is touched, so a refused attempt leaves nothing behind."""
    device, rank, world = setup_device(args)
    resumed = load_resume_state(args) if args.resume else None
    dataset = load_data(args)
    if not resumed and os.path.exists(os.path.join(args.out, "checkpoint")):  # never overwrite a run
        fail(f"--out {args.out} already holds a run: continue it with --resume {args.out}, or pick another "
             "--out")
    torch.manual_seed(args.seed)
    agent, optimizer = build_agent(args, resumed, device, world)
    # each rank trains on its shard
    buffer = Buffer(dataset["episodes"][rank::world] if dataset else [], args.gamma)
    run = Run(agent, optimizer, PolicyAverage(agent.vlm, args.policy_average), buffer,
              np.random.default_rng(args.seed), device, rank, world, num_offline=len(buffer.episodes))
    if resumed:
        restore(run, resumed, args)
    if run.step < args.offline_steps and not buffer.episodes:
        fail("the buffer is empty: give --offline data.pt, or --offline-steps 0 for a purely online run")
    if run.master:
        os.makedirs(args.out, exist_ok=True)
        run.log = open_log(args, resumed)
        vlm = sum(p.numel() for p in agent.vlm.parameters())
        adapters = sum(p.numel() for p in agent.vlm.parameters() if p.requires_grad)
        critic = sum(p.numel() for p in agent.critic.parameters() if p.requires_grad)
        print(f"model {args.model}: {vlm:,} parameters in the VLM; trained: {adapters:,} in the VLM "
              f"({args.finetune}) and {critic:,} in the critic head ({args.critic_head})")
    return run


# --- Train loop: offline steps, then online rounds, then evaluation -----------------------------------------
def solved_share(args: Args, phase: str):
    """The share of a batch drawn from rewarded episodes. Online, --solved-replay. Offline, where the filter
    drops the turns of failed episodes, the rewarded episodes' turns are what the actor learns from: at the
    data's rate (0.13 of GoToRedBall mixed-0.1's episodes) most batches held none. SFT, and AFSFT without
    --drop-failed, sample the data as it is."""
    drops_failed = args.drop_failed and args.filter == "exp"
    return args.solved_replay if phase == "online" or drops_failed else 0.0


def train_step(run: Run, args: Args, phase: str):
    """One gradient step, then what is due at it: a metrics line, an evaluation, a checkpoint."""
    if run.interrupted:  # Ctrl-C, raised here: inside a library's finalizer it would be lost
        raise KeyboardInterrupt
    batch = run.buffer.sample(run.rng, args.batch_turns, args.run_length, solved_share(args, phase))
    # Online the data's two witnesses are silent and the critic decides alone, so its loss also shapes the
    # features it reads (see afsft_loss).
    step_args = args if phase == "offline" else replace(
        args, spare_rewarded=False, drop_failed=False, critic_trunk=args.online_critic_trunk)
    warmup = run.step < int(args.sft_warmup * args.offline_steps)  # f = 1 while the critic first learns
    stats = gradient_step(run.agent, run.optimizer, batch, step_args, warmup, run.device, run.world)
    run.average.update()
    run.step += 1
    evaluating = args.eval_every and run.step % args.eval_every == 0
    if run.master and (run.step % args.log_every == 0 or run.step == total_steps(args) or evaluating):
        stats.update({"step": run.step, "phase": phase,
                      "charts/buffer_turns": sum(len(ep["actions"]) for ep in run.buffer.episodes)})
        if run.new_episodes:
            rollouts = episode_stats(run.new_episodes, run.success)
            stats.update({f"rollout/{key}": value for key, value in rollouts.items()})
            run.new_episodes = []
        if evaluating:
            with run.average.in_place():
                result = evaluate(run.agent, args, max(args.eval_episodes // 2, 1), run.device)
            stats.update({f"eval/{key}": value for key, value in result.items()})
        print(json.dumps(stats), file=run.log, flush=True)
    if run.master and run.step % args.save_every == 0:
        save_checkpoint(args, run)
    return stats


def show(bar, stats):
    bar.set_postfix({name: round(stats[key], 3) for name, key in
                     (("actor", "losses/actor"), ("critic", "losses/critic"), ("kept", "critic/kept"))
                     if key in stats})
    bar.update()


def finish(run: Run, args: Args):
    """After the last step: the checkpoint, the final greedy evaluation, eval.json, and where it all is."""
    if run.world > 1:  # gradients were averaged, so every rank must end with the same weights
        checksum = torch.stack([p.detach().float().sum() for p in run.agent.parameters() if p.requires_grad])
        low, high = checksum.clone(), checksum.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.barrier()  # no rank tears down its connections while a collective is still in flight
        dist.destroy_process_group()
        if not torch.equal(low, high):
            fail(f"rank {run.rank}: the ranks ended with different weights")
    if not run.master:
        return {}
    save_checkpoint(args, run)
    with run.average.in_place():
        result = evaluate(run.agent, args, args.eval_episodes, run.device) if args.eval_episodes else {}
    if result:
        logged = {f"eval/{key}": value for key, value in result.items()}
        print(json.dumps({"step": run.step, "phase": "eval", **logged}), file=run.log)
        with open(os.path.join(args.out, "eval.json"), "w") as f:
            json.dump(result, f, indent=2)
        print(json.dumps(result))
        if result["valid_action_rate"] < 0.5:
            print(f"warning: the policy is not writing valid actions ({result['valid_action_rate']:.2f} of "
                  "its turns); see the README, 'Runs that go wrong'", file=sys.stderr)
    run.log.close()
    print(f"wrote {args.out}: metrics.jsonl, checkpoint/" + (", eval.json" if result else ""))
    return result


def train(args: Args):
    run = setup(args)
    total, rollout = total_steps(args), None

    def on_ctrl_c(*_):  # the loop stops at its next step and saves; a second Ctrl-C interrupts at once
        run.interrupted = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous_handler = signal.signal(signal.SIGINT, on_ctrl_c)
    bar = tqdm(total=total, initial=run.step, desc="train", dynamic_ncols=True, disable=not run.master)
    try:
        while run.step < args.offline_steps:  # offline: gradient steps on the dataset
            show(bar, train_step(run, args, "offline"))
        # online rounds: every env acts for --rollout-len turns, then the agent learns
        while run.step < total:
            if rollout is None:  # the online phase starts, or resumes
                for group in run.optimizer.param_groups:
                    group["lr"] = args.online_lr
                rollout = Rollout(args, seed=args.seed * 7919 + run.step)
                run.success = rollout.envs[0].success
            for _ in range(args.rollout_len):
                finished = rollout.step(run.agent, args, args.temperature, run.device, args.explore)
                run.buffer.episodes += finished
                run.new_episodes += finished
                if run.interrupted:
                    raise KeyboardInterrupt
            for _ in range(args.updates_per_round):
                if run.step < total and on_all_ranks(run.buffer.episodes, run.device, run.world):
                    show(bar, train_step(run, args, "online"))
    except (KeyboardInterrupt, envs.BrowserDied) as err:  # stop cleanly, keeping what was learned
        if run.master:
            save_checkpoint(args, run)
        fail(f"{str(err) or 'interrupted'}; checkpoint saved at step {run.step}, continue with "
             f"--resume {args.out}")
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        bar.close()
        if rollout is not None:
            rollout.close()
    return finish(run, args)


def main(argv=None):
    import transformers

    transformers.logging.disable_progress_bar()  # keep the one progress bar that matters: training
    train(parse_args(argv))


if __name__ == "__main__":
    main()
