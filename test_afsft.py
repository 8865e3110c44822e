"""Tests for afsft.py and envs.py: losses against hand-computed values, the dataset
contract, the buffer, the env wrappers, and short end-to-end runs through the CLI.

Tests that start a process, a browser or a training run are marked `slow`:
    python -m pytest -q -m "not slow" test_afsft.py    # the fast subset, while editing
"""
import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import types
import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from gymnasium.utils.env_checker import check_env

import afsft
import envs

HERE = os.path.dirname(os.path.abspath(__file__))


# ---------------------------------------------------------------------------
# Losses, on small tensors with values computed by hand
# ---------------------------------------------------------------------------
def test_state_value_is_policy_weighted_q():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # pi = [0.25, 0.75]
    q = torch.tensor([[4.0, 8.0]])
    assert afsft.state_values(logits, q).item() == pytest.approx(0.25 * 4 + 0.75 * 8)


def test_td_target_inside_a_turn_and_at_the_boundary():
    # two turns: 3 tokens then 2 tokens
    v_bar = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    is_last = torch.tensor([False, False, True, False, True])
    reward, not_done, v_next = torch.tensor([0.5, 1.0]), torch.tensor([1.0, 1.0]), torch.tensor([4.0, 10.0])
    targets = afsft.td_targets(v_bar, is_last, reward, 0.9, not_done, v_next)
    # inside a turn: the next token's value, undiscounted; at the end: r + gamma Vbar(next turn's first state)
    assert targets.tolist() == pytest.approx([2.0, 3.0, 0.5 + 0.9 * 4.0, 5.0, 1.0 + 0.9 * 10.0])


def test_td_target_mixes_the_turns_monte_carlo_return_into_each_of_its_tokens():
    v_bar = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    is_last = torch.tensor([False, False, True, False, True])
    reward, not_done, v_next = torch.tensor([0.5, 1.0]), torch.tensor([1.0, 1.0]), torch.tensor([4.0, 10.0])
    returns, weight = torch.tensor([2.0, 3.0]), torch.tensor([0.25, 0.0])  # the second episode was truncated
    targets = afsft.td_targets(v_bar, is_last, reward, 0.9, not_done, v_next, returns, weight)

    def mix(td):
        return 0.75 * td + 0.25 * 2.0

    assert targets.tolist() == pytest.approx([mix(2.0), mix(3.0), mix(0.5 + 0.9 * 4.0), 5.0,
                                              1.0 + 0.9 * 10.0])


def test_td_target_done_does_not_bootstrap_but_truncated_does():
    v_bar, is_last = torch.tensor([7.0]), torch.tensor([True])
    done = afsft.td_targets(v_bar, is_last, torch.tensor([1.0]), 0.9, torch.tensor([0.0]),
                            torch.tensor([3.0]))
    truncated = afsft.td_targets(v_bar, is_last, torch.tensor([1.0]), 0.9, torch.tensor([1.0]),
                                 torch.tensor([3.0]))
    assert done.item() == pytest.approx(1.0)
    assert truncated.item() == pytest.approx(1.0 + 0.9 * 3.0)


def test_critic_loss_ignores_masked_tokens():
    q, targets = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 0.0, 100.0])
    loss = afsft.critic_loss(q, targets, torch.tensor([1.0, 1.0, 0.0]))
    assert loss.item() == pytest.approx((1 + 4) / 2)


def test_state_value_baseline_ignores_tokens_no_batch_has_held():
    logits = torch.tensor([[0.0, math.log(3.0), 5.0]])  # the third token: never in the data, Q untrained
    q = torch.tensor([[4.0, 8.0, 100.0]])
    seen = torch.tensor([True, True, False])
    assert afsft.state_values(logits, q, seen).item() == pytest.approx(0.25 * 4 + 0.75 * 8)


def test_critic_health_splits_syntax_from_decisions_and_correlates_with_returns():
    # two turns, "5 x 7": 5 and 7 are in both responses (syntax), 1 and 2 in one each (decisions)
    tokens, lengths = torch.tensor([5, 1, 7, 5, 2, 7]), torch.tensor([3, 3])
    advantage = torch.tensor([0.0, 2.0, 0.0, 0.0, 4.0, 0.0])
    batch = {"has_return": torch.tensor([True, True]), "returns": torch.tensor([1.0, 0.0])}
    q_returns = torch.tensor([0.9, 0.8, 0.9, 0.1, 0.2, 0.1])  # higher in the turn with the higher return
    weights = torch.tensor([1.0, 3.0, 1.0, 1.0, 0.5, 0.0])
    stats = afsft.critic_health(advantage, tokens, lengths, q_returns, batch, weights, "cpu")
    assert stats["critic/advantage_syntax"] == pytest.approx(0.0)
    assert stats["critic/advantage_decision"] == pytest.approx(3.0)
    assert stats["critic/kept"] == pytest.approx((1 + 1 + 1 + 1 + 0.5 + 0) / 6)
    assert 0.9 < stats["critic/mc_correlation"] <= 1.0


def test_exp_filter_keeps_sft_weight_at_zero_advantage():
    for beta in (0.1, 1.0, 30.0):
        assert afsft.filter_weights(torch.zeros(3), "exp", beta=beta).tolist() == [1.0, 1.0, 1.0]


def test_binary_filter_keeps_exactly_positive_advantages():
    advantage = torch.tensor([-1.0, 0.0, 1e-6, 2.0, -3e-7])
    assert afsft.filter_weights(advantage, "binary").tolist() == [0.0, 0.0, 1.0, 1.0, 0.0]


def test_exp_filter_is_capped():
    w = afsft.filter_weights(torch.tensor([0.0, 1.0, 10.0]), "exp", beta=1.0, max_weight=5.0)
    assert w.tolist() == pytest.approx([1.0, math.e, 5.0])


def test_exp_filter_drops_tokens_past_the_margin_only():
    advantage = torch.tensor([-1.0, -0.3, -0.2, 0.0, 0.5, 5.0])
    w = afsft.filter_weights(advantage, "exp", beta=1.0, max_weight=3.0, drop_margin=0.25)
    assert w.tolist() == pytest.approx([0.0, 0.0, math.exp(-0.2), 1.0, math.exp(0.5), 3.0])
    plain = afsft.filter_weights(advantage, "exp", beta=1.0, max_weight=3.0, drop_margin=float("inf"))
    assert plain[:2].tolist() == pytest.approx([math.exp(-1.0), math.exp(-0.3)])


def test_exp_filter_spares_the_tokens_the_data_vouches_for():
    """A spared token past the margin keeps its soft weight; the others are dropped or kept as before."""
    advantage = torch.tensor([-1.0, -1.0, -0.1, 2.0])
    spared = torch.tensor([False, True, False, True])
    w = afsft.filter_weights(advantage, "exp", beta=1.0, max_weight=3.0, drop_margin=0.25, spared=spared)
    assert w.tolist() == pytest.approx([0.0, math.exp(-1.0), math.exp(-0.1), 3.0])


def test_exp_filter_drops_the_condemned_tokens_unless_the_critic_is_sure():
    """A token of a turn whose episode failed is dropped unless A > m; spared and plain tokens as before."""
    advantage = torch.tensor([-1.0, 0.1, 0.3, 2.0, -0.1, -1.0])
    spared = torch.tensor([False, False, False, False, False, True])
    condemned = torch.tensor([True, True, True, True, False, False])
    w = afsft.filter_weights(advantage, "exp", beta=1.0, max_weight=3.0, drop_margin=0.25, spared=spared,
                             condemned=condemned)
    assert w.tolist() == pytest.approx([0.0, 0.0, math.exp(0.3), 3.0, math.exp(-0.1), math.exp(-1.0)])


def test_buffer_marks_the_turns_that_went_on_to_a_positive_reward():
    """Rewards -0.1, 0, 1, 0: turns 0-2 precede or earn the reward, turn 3 comes after it."""
    episode = make_episode(4, True)
    episode["rewards"] = torch.tensor([-0.1, 0.0, 1.0, 0.0])
    unrewarded = make_episode(2, True)
    unrewarded["rewards"] = torch.tensor([0.0, -1.0])
    turns = [(0, t, False) for t in range(4)] + [(1, 0, False)]
    batch = afsft.Buffer([episode, unrewarded]).collate(turns, [])
    assert batch["rewarded_after"].tolist() == [True, True, True, False, False]
    assert batch["failed_after"].tolist() == [False, False, False, True, True]


def test_filter_none_is_exactly_sft_cross_entropy():
    torch.manual_seed(0)
    logits, tokens, lengths = torch.randn(5, 11), torch.tensor([3, 1, 4, 1, 5]), torch.tensor([2, 3])
    logp = torch.log_softmax(logits, -1).gather(1, tokens[:, None])[:, 0]
    loss = afsft.actor_loss(logp, afsft.filter_weights(torch.randn(5), "none"), lengths)
    sft = (F.cross_entropy(logits[:2], tokens[:2]) + F.cross_entropy(logits[2:], tokens[2:])) / 2
    assert loss.item() == pytest.approx(sft.item(), rel=1e-6)


def test_actor_loss_normalises_by_all_tokens_of_the_turn():
    logp = torch.tensor([-1.0, -2.0, -4.0])
    loss = afsft.actor_loss(logp, torch.tensor([1.0, 0.0, 1.0]), torch.tensor([3]))
    assert loss.item() == pytest.approx((1.0 + 4.0) / 3)  # not / 2: dropped tokens shrink the gradient


# ---------------------------------------------------------------------------
# The model, the encoding and the buffer
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    args = afsft.Args()  # the shipped pretrained base, LoRA, the critic from the language head
    torch.manual_seed(0)
    return afsft.load_agent(args, afsft.TINY_BASE), args


def test_encode_marks_one_state_per_response_token(tiny):
    agent, _ = tiny
    image = np.zeros((56, 56, 3), np.uint8)
    responses = ["[action] turn left", "[action] go forward now please"]
    inputs, state_mask, tokens, lengths = afsft.encode(agent.processor, [image, image],
                                                       ["a", "a longer prompt"], responses)
    tok = agent.processor.tokenizer
    expected = [tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in responses]
    assert lengths.tolist() == [len(e) for e in expected]
    assert tokens.tolist() == expected[0] + expected[1]
    assert state_mask.sum().item() == sum(lengths.tolist())
    # each state is the position just before its token
    for b in range(2):
        positions = state_mask[b].nonzero()[:, 0]
        assert inputs["input_ids"][b, positions + 1].tolist() == expected[b]


def test_critic_head_starts_at_zero_the_mean_return(tiny):
    agent, _ = tiny
    d, vocab = agent.vlm.get_output_embeddings().in_features, agent.vlm.get_output_embeddings().out_features
    assert torch.equal(agent.critic(torch.randn(4, d)), torch.zeros(4, vocab))
    trainable = sum(p.numel() for p in agent.critic.parameters() if p.requires_grad)
    assert agent.critic.base is None and trainable == d * 32 + 32 * vocab + vocab  # far below d * vocab


def test_critic_head_under_lm_init_starts_at_the_language_head_logits(tiny):
    agent, _ = tiny
    lm_head = agent.vlm.get_output_embeddings()
    critic = afsft.CriticHead(lm_head, "lowrank", 8, init="lm")
    h = torch.randn(4, lm_head.in_features)
    assert torch.allclose(critic(h), lm_head(h), atol=1e-5)


def test_popart_rescaling_keeps_every_q_in_return_units():
    torch.manual_seed(0)
    critic = afsft.CriticHead(nn.Linear(6, 5, bias=False), "lowrank", 3)
    nn.init.normal_(critic.up.weight)
    nn.init.normal_(critic.bias)
    h = torch.randn(4, 6)
    before = critic.to_returns(critic(h))
    critic.set_statistics(torch.tensor(2.0), torch.tensor(13.0))  # mean 2, std sqrt(13 - 4) = 3
    assert critic.return_std().item() == pytest.approx(3.0)
    assert torch.allclose(critic.to_returns(critic(h)), before, atol=1e-5)
    assert critic.normalise(torch.tensor(8.0)).item() == pytest.approx((8.0 - 2.0) / 3.0)


def test_return_statistics_average_the_first_batches_then_move_at_the_rate(tiny):
    agent, _ = tiny
    saved = {k: v.clone() for k, v in agent.critic.state_dict().items()}
    agent.update_return_statistics(torch.tensor([1.0, 3.0, 50.0]), torch.tensor([1.0, 1.0, 0.0]), rate=0.01)
    # the first batch is taken whole (its unmasked targets)
    assert (agent.critic.return_mean.item(), agent.critic.return_std().item()) == pytest.approx((2.0, 1.0))
    agent.update_return_statistics(torch.tensor([6.0, 6.0]), torch.ones(2), rate=0.01)  # second: 1/2 > rate
    assert agent.critic.return_mean.item() == pytest.approx(4.0)
    assert agent.target.return_mean.item() == pytest.approx(4.0)  # the target head is rescaled alike
    assert agent.critic.return_square.item() == pytest.approx((5.0 + 36.0) / 2)
    agent.critic.load_state_dict(saved)
    agent.target.load_state_dict(saved)


def test_policy_average_is_the_mean_of_the_first_steps_then_an_ema_and_swaps_back():
    layer = nn.Linear(1, 1, bias=False)
    layer.requires_grad_(True)
    average = afsft.PolicyAverage(layer, rate=0.25)
    for w in (1.0, 3.0, 5.0, 7.0, 9.0):  # the trained weight after each of five steps
        with torch.no_grad():
            layer.weight.fill_(w)
        average.update()
        if w == 7.0:  # updates 1-4: 1/n >= rate, the plain mean of 1, 3, 5, 7
            assert average.average["weight"].item() == pytest.approx(4.0)
    assert average.average["weight"].item() == pytest.approx(4.0 + 0.25 * (9.0 - 4.0))  # then the EMA
    with pytest.raises(RuntimeError), average.in_place():  # evaluated in place, even a failure swaps back
        assert layer.weight.item() == pytest.approx(5.25)
        raise RuntimeError
    assert layer.weight.item() == 9.0
    off = afsft.PolicyAverage(layer, rate=0.0)  # --policy-average 0: the last weights
    off.update()
    with off.in_place():
        assert layer.weight.item() == 9.0


@pytest.mark.slow
def test_a_resumed_run_ends_with_the_policy_and_average_of_one_run_straight(tmp_path, dataset):
    """policy/ holds the average (what eval.json measures), state.pt the trained weights; a resume restores
    both. (A resume is not bit for bit: its weights differ from the straight run's by about 5e-6, while the
    average and the trained weights differ by about 2e-3.)"""
    from safetensors.torch import load_file
    # no filter warm-up: its length follows --offline-steps, which the resume raises from 3 to 6
    flags = ["--offline", dataset, "--eval-episodes", "0", "--policy-average", "0.3", "--sft-warmup", "0",
             *SMALL]
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    for argv in (["--out", straight, "--offline-steps", "6"], ["--out", split, "--offline-steps", "3"],
                 ["--resume", split, "--offline-steps", "6"]):
        result = run_cli(*flags, *argv)
        assert result.returncode == 0, result.stderr[-3000:]
    ends = []
    for run in (straight, split):
        state = torch.load(os.path.join(run, "checkpoint", "state.pt"), weights_only=True)
        policy = load_file(os.path.join(run, "checkpoint", "policy", "adapter_model.safetensors"))
        # the adapters' names in policy/ are peft's, without the adapter's name
        trained = state["trained_policy"]
        average = {k: policy["base_model.model." + k.replace(".default", "")] for k in trained}
        ends.append((state["average_updates"], trained, average))
    (updates, trained, average), (resumed_updates, resumed_trained, resumed_average) = ends
    assert updates == resumed_updates == 6 and len(trained) == len(resumed_trained) > 0

    def close(a, b):
        return all(torch.allclose(a[k], b[k], rtol=0, atol=1e-4) for k in a)
    assert close(trained, resumed_trained) and close(average, resumed_average)
    assert not close(average, trained)  # the average lags the trained weights


def test_the_critic_moves_the_trunk_from_valid_turns_only(tiny):
    """--critic-trunk valid: the critic's loss on turns the env rejected trains its head, not the VLM; all
    (the paper's) trains both. Every turn here is invalid, so the actor adds nothing to the VLM's gradient."""
    agent, args = tiny
    episode = make_episode(6, True)
    episode["valid"][:] = False
    batch = afsft.Buffer([episode]).sample(np.random.default_rng(1), batch_turns=6, run_length=3)
    lora = [p for p in agent.policy.parameters() if p.requires_grad]
    heads = {k: v.clone() for k, v in agent.critic.state_dict().items()}
    random_heads = {**heads, "up.weight": torch.randn_like(heads["up.weight"])}  # at zero Q ignores h
    trunk_gradient = {}
    for trunk in ("valid", "all"):
        agent.critic.load_state_dict(random_heads)
        agent.target.load_state_dict(random_heads)
        agent.zero_grad(set_to_none=True)
        loss, _ = afsft.afsft_loss(agent, batch, afsft.replace(args, critic_trunk=trunk), False, "cpu")
        loss.backward()
        trunk_gradient[trunk] = sum(float(p.grad.norm()) for p in lora if p.grad is not None)
        assert agent.critic.up.weight.grad.abs().sum() > 0  # the head learns the penalty either way
    agent.zero_grad(set_to_none=True)
    agent.critic.load_state_dict(heads)
    agent.target.load_state_dict(heads)
    assert trunk_gradient["valid"] == 0 and trunk_gradient["all"] > 0


def test_the_policy_step_does_not_depend_on_the_critics_error(tiny):
    """With --critic-trunk none the critic reads detached features and has its own gradient clip, so
    scaling its loss by 10^4 leaves the policy's update exactly as it was."""
    agent, args = tiny
    args = afsft.replace(args, critic_trunk="none")
    buffer = afsft.Buffer([make_episode(6, True), make_episode(5, False)])
    batch = buffer.sample(np.random.default_rng(1), batch_turns=6, run_length=3)
    lora = [p for p in agent.policy.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in lora]
    heads = {k: v.clone() for k, v in agent.critic.state_dict().items()}
    steps = []
    for coef in (1.0, 1e4):
        agent.critic.load_state_dict(heads)
        agent.target.load_state_dict(heads)
        optimizer = torch.optim.AdamW([p for p in agent.parameters() if p.requires_grad], lr=1e-3)
        afsft.gradient_step(agent, optimizer, batch, afsft.replace(args, critic_coef=coef), False, "cpu")
        steps.append([p.detach() - s for p, s in zip(lora, start)])
        for p, s in zip(lora, start):
            p.data.copy_(s)
    assert all(torch.equal(a, b) for a, b in zip(*steps)) and any(a.abs().sum() > 0 for a in steps[0])
    agent.critic.load_state_dict(heads)
    agent.target.load_state_dict(heads)


def load_pretrain_script():
    spec = importlib.util.spec_from_file_location("pretrain", os.path.join(HERE, "tiny_vlm", "pretrain.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def blackjack_render(seed, extra_cards=0):
    """A Blackjack picture and the player's cards (the base's held-out renders use other seeds)."""
    env = envs.make_env("blackjack", seed=seed)
    env.player += [env.deal() for _ in range(extra_cards)]
    return env.image(), env.player, env.dealer[0]


def test_shipped_base_matches_the_pretrain_script_and_reads_its_images(tiny):
    agent, _ = tiny
    pretrain = load_pretrain_script()
    config = agent.vlm.config
    assert (config.vision_config.image_size, config.vision_config.patch_size) == (pretrain.IMAGE_SIZE,
                                                                                  pretrain.PATCH_SIZE)
    assert agent.processor.image_processor.size["height"] == pretrain.IMAGE_SIZE
    assert config.text_config.vocab_size == len(agent.processor.tokenizer)
    weights = os.path.join(afsft.TINY_BASE, "model.safetensors")
    with open(weights, "rb") as f:
        assert '"F16"' in f.read(2000).decode("latin-1")  # stored in half precision
    assert os.path.getsize(weights) < 25e6
    # it captions Blackjack renders it never saw from the pixels alone (its report: 0.835 of 200)
    renders = [blackjack_render(7_000_000 + seed) for seed in range(10)]
    captions = afsft.generate(agent, [image for image, _, _ in renders], [pretrain.CAPTION_PROMPT] * 10, 0.0,
                              32, "cpu")
    right = sum(caption == f"Dealer shows {envs.rank_name(dealer[0])}. Your cards: "
                f"{', '.join(envs.rank_name(card[0]) for card in player)}."
                for caption, (_, player, dealer) in zip(captions, renders))
    assert right >= 6


def test_pretraining_never_answers_with_an_env_action_or_its_tag():
    """The base learns to see and to follow instructions, never an env's action syntax: no response of its
    data is an env's action or holds the "[action]" tag (the paper's base has not seen the task)."""
    pretrain = load_pretrain_script()
    rng = np.random.default_rng(0)
    actions = {a for name in ["numberline", "ezpoints", "blackjack", "babyai"]
               for a in envs.make_env(name).action_words}
    responses = [pretrain.instruction_sample(rng, None)[2] for _ in range(3000)]
    tagged = [r.split("] ", 1)[1] for r in responses if r.startswith("[") and "] " in r]
    clicks = re.compile(r"click\((ref|x)=")
    assert not [r for r in responses + tagged if "[action]" in r or r in actions or clicks.match(r)]
    for sample in pretrain.CAPTIONS.values():  # what a picture shows may be a number or a card, not a move
        caption = sample(rng)[1]
        assert "[action]" not in caption and caption not in actions


def test_lora_fine_tune_learns_a_new_question_from_pixels(tiny):
    """The regression test for a blind model: a short LoRA fine-tune through afsft_loss learns to answer a
    question the base never saw ("do you hold more than two cards?") on renders it never saw. The answer is
    in the pixels alone, so a model that ignores its image stays at chance on the held-out ones."""
    _, args = tiny
    torch.manual_seed(0)
    agent = afsft.load_agent(args, afsft.TINY_BASE)
    question = "Do you hold more than two cards? Answer yes or no."

    def sample(seed):
        image, player, _ = blackjack_render(seed, extra_cards=seed % 2)
        return image, "yes" if len(player) > 2 else "no"

    sft = afsft.replace(args, filter="none", max_new_tokens=4)
    optimizer = torch.optim.AdamW([p for p in agent.parameters() if p.requires_grad], lr=1e-3)
    for step in range(40):
        images, answers = zip(*[sample(step * 16 + i) for i in range(16)])
        batch = {"images": images, "prompts": [question] * 16, "actions": answers}
        loss, _ = afsft.afsft_loss(agent, batch, sft, warmup=True, device="cpu")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    images, answers = zip(*[sample(9_000_000 + i) for i in range(12)])  # held out, 6 yes and 6 no
    replies = afsft.generate(agent, images, [question] * 12, 0.0, 4, "cpu")
    assert sum(r.strip() == a for r, a in zip(replies, answers)) >= 11


def make_episode(T, terminated, prompt="p", image_side=56):
    return {"images": torch.zeros(T, image_side, image_side, 3, dtype=torch.uint8),
            "prompts": [f"{prompt}{t}" for t in range(T)],
            "actions": ["[action] go forward"] * T, "rewards": torch.arange(T, dtype=torch.float32),
            "valid": torch.ones(T, dtype=torch.bool), "terminated": terminated, "truncated": not terminated}


def test_buffer_samples_runs_of_consecutive_turns():
    buffer = afsft.Buffer([make_episode(10, True), make_episode(3, False)])
    batch = buffer.sample(np.random.default_rng(0), batch_turns=12, run_length=4)
    assert len(batch["prompts"]) == 12
    turns = [int(p[1:]) for p in batch["prompts"]]
    for i in range(11):  # next_in_batch says the next row is this turn's successor
        if batch["next_in_batch"][i]:
            assert turns[i + 1] == turns[i] + 1
    for row, prompt in zip(batch["boot_of"].tolist(), batch["boot_prompts"]):
        assert int(prompt[1:]) == turns[row] + 1 and not batch["next_in_batch"][row]
    for i, t in enumerate(turns):  # done only on the last turn of the terminated episode
        assert batch["done"][i] == (t == 9 and batch["rewards"][i] == 9)
        if batch["has_return"][i]:  # rewards are 0..9: G_t = sum_k 0.9^k (t + k)
            assert batch["returns"][i].item() == pytest.approx(sum(0.9 ** k * (t + k) for k in range(10 - t)))
    # truncated
    assert batch["has_return"].all() and not buffer.collate([(1, 0, False)], [])["has_return"].any()


def test_offline_batches_replay_solved_episodes_only_where_the_filter_drops_failed_ones():
    """Online every filter replays --solved-replay; offline only the exp filter with --drop-failed does."""
    assert afsft.solved_share(afsft.Args(), "offline") == 0.5
    assert afsft.solved_share(afsft.Args(), "online") == 0.5
    assert afsft.solved_share(afsft.Args(filter="none"), "offline") == 0.0  # SFT samples the data as it is
    assert afsft.solved_share(afsft.Args(filter="none"), "online") == 0.5
    assert afsft.solved_share(afsft.Args(drop_failed=False), "offline") == 0.0
    assert afsft.solved_share(afsft.Args(filter="binary"), "offline") == 0.0


def test_solved_replay_fills_its_share_of_the_batch_from_rewarded_episodes():
    """--solved-replay 0.5: the first half of the turns come from the one rewarded episode of 21 (by length
    it would be 1 turn in 41); with none rewarded, or a share of 0, episodes are drawn by length alone."""
    solved = make_episode(2, True, prompt="s")
    failures = [make_episode(2, True, prompt=f"f{i}") for i in range(20)]
    for episode in failures:
        episode["rewards"] = torch.tensor([0.0, -0.1])
    buffer = afsft.Buffer(failures + [solved])
    batch = buffer.sample(np.random.default_rng(0), batch_turns=16, run_length=2, solved_share=0.5)
    assert all(p.startswith("s") for p in batch["prompts"][:8])
    by_length = buffer.sample(np.random.default_rng(0), batch_turns=16, run_length=2)
    assert sum(p.startswith("s") for p in by_length["prompts"]) < 8
    unrewarded = afsft.Buffer(failures).sample(np.random.default_rng(0), 16, 2, solved_share=0.5)
    assert len(unrewarded["prompts"]) == 16


def test_afsft_loss_trains_critic_and_trunk_and_sft_skips_the_critic(tiny):
    agent, args = tiny
    buffer = afsft.Buffer([make_episode(6, True), make_episode(5, False)])
    batch = buffer.sample(np.random.default_rng(1), batch_turns=6, run_length=3)
    loss, stats = afsft.afsft_loss(agent, batch, args, warmup=False, device="cpu")
    agent.zero_grad()
    loss.backward()
    assert math.isfinite(loss.item()) and 0 <= stats["critic/kept"] <= 1
    assert agent.critic.up.weight.grad.abs().sum() > 0
    assert agent.vlm.model.language_model.layers[0].mlp.up_proj.lora_B.default.weight.grad.abs().sum() > 0
    agent.zero_grad()
    sft_args = afsft.replace(args, filter="none")
    loss, stats = afsft.afsft_loss(agent, batch, sft_args, warmup=False, device="cpu")
    loss.backward()
    assert "losses/critic" not in stats and agent.critic.up.weight.grad is None
    agent.zero_grad()


def test_grammar_loss_holds_the_datas_continuations_and_filters_only_the_choice():
    """(6) by hand: two valid turns "[ left <end>" and "[ right <end>" and a rejected "[ up <end>". After
    "[" the data's valid turns hold {left, right}; elsewhere one token, where f has no say."""
    agent = types.SimpleNamespace(valid_responses=set())
    logp = torch.log_softmax(torch.randn(9, 10, generator=torch.Generator().manual_seed(0)), -1)
    tokens = torch.tensor([1, 2, 9, 1, 3, 9, 1, 4, 9])
    lengths, valid = torch.tensor([3, 3, 3]), torch.tensor([True, True, False])
    weights = torch.tensor([0.5, 3.0, 2.0, 1.5, 0.2, 0.7, 0.0, 0.0, 0.0])  # f(A), 0 on the rejected turn
    loss = afsft.grammar_loss(agent, logp, tokens, lengths, weights, valid)

    def turn(rows, choice, w):
        both = torch.logsumexp(torch.stack([logp[rows[1], 2], logp[rows[1], 3]]), 0)
        return -(logp[rows[0], 1] + both + w * (logp[rows[1], choice] - both) + logp[rows[2], 9]) / 3

    expected = (turn([0, 1, 2], 2, 3.0) + turn([3, 4, 5], 3, 0.2)) / 3  # the rejected turn counts 0
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert agent.valid_responses == {(1, 2, 9), (1, 3, 9)}  # the rejected text is not grammar
    # with f = 1 it is SFT's loss on the valid turns
    sft = afsft.actor_loss(logp[torch.arange(9), tokens], torch.tensor([1.0] * 6 + [0.0] * 3), lengths)
    ones = torch.tensor([1.0] * 6 + [0.0] * 3)
    assert afsft.grammar_loss(agent, logp, tokens, lengths, ones, valid).item() == pytest.approx(sft.item())


def test_the_actor_skips_turns_the_env_rejected_unless_told_to_imitate_them(tiny):
    """Turn 1 of 3 is invalid text: by default AFSFT's actor loss is SFT's on the two valid turns, scaled by
    2/3 (the loss averages over all turns); with --imitate-invalid (and with --filter none) it is SFT's on
    all three. Checked in the warm-up, where f = 1, so only the env's verdict differs."""
    agent, args = tiny
    saved = {k: v.clone() for k, v in agent.critic.state_dict().items()}
    episode = make_episode(4, True)
    episode["actions"][1], episode["valid"][1] = "[action] jump", False
    buffer = afsft.Buffer([episode])
    batch = buffer.collate([(0, 0, True), (0, 1, True), (0, 2, False)], [(2, 0, 3)])
    sft = afsft.replace(args, filter="none")

    def actor(batch, args):
        return afsft.afsft_loss(agent, batch, args, warmup=True, device="cpu")[1]["losses/actor"]

    valid_only = actor(buffer.collate([(0, 0, False), (0, 2, False)], []), sft)
    assert actor(batch, args) == pytest.approx(valid_only * 2 / 3, rel=1e-5)
    imitate = afsft.replace(args, imitate_invalid=True)
    assert actor(batch, imitate) == pytest.approx(actor(batch, sft), rel=1e-5)
    assert actor(batch, sft) > actor(batch, args)
    agent.valid_responses.clear()  # "[action] jump" joined the grammar under --imitate-invalid
    agent.critic.load_state_dict(saved)
    agent.target.load_state_dict(saved)


def test_the_actor_skips_a_turn_that_changed_nothing_where_its_exact_advantage_is_negative(tiny):
    """Turn 1 of 4 sees the same image and prompt after it as before it (a step into a wall) and earns 0,
    so A = 0 - (1 - gamma) V(s). With every Q (and so V) at +1 the actor skips it; at -1, where waiting
    postpones a loss, it imitates it. In the warm-up, f = 1; without
    the grammar term, whose hold on the valid set a skipped valid turn keeps."""
    agent, args = tiny
    skip, args = afsft.replace(args, grammar=False), afsft.replace(args, grammar=False, skip_unchanged=False)
    saved = {k: v.clone() for k, v in agent.critic.state_dict().items()}
    episode = make_episode(4, True)
    episode["prompts"][2], episode["rewards"][1] = episode["prompts"][1], 0.0
    buffer = afsft.Buffer([episode])
    batch = buffer.collate([(0, 0, True), (0, 1, True), (0, 2, False)], [(2, 0, 3)])
    assert batch["unchanged"].tolist() == [False, True, False]

    def actor(batch, args, mean):
        for head in (agent.critic, agent.target):  # every Q, and so V, is `mean` in return units
            head.load_state_dict(saved)
            head.return_mean.fill_(0.0)  # statistics mean 0, std 1 (every loss call moves them)
            head.return_square.fill_(1.0)
            head.bias.data.fill_(mean)
        return afsft.afsft_loss(agent, batch, args, warmup=True, device="cpu")[1]["losses/actor"]

    others = actor(buffer.collate([(0, 0, False), (0, 2, False)], []), args, 1.0)
    assert actor(batch, skip, 1.0) == pytest.approx(others * 2 / 3, rel=1e-5)
    assert actor(batch, skip, -1.0) == pytest.approx(actor(batch, args, -1.0), rel=1e-5)
    assert actor(batch, args, 1.0) > actor(batch, skip, 1.0)
    agent.critic.load_state_dict(saved)
    agent.target.load_state_dict(saved)


# ---------------------------------------------------------------------------
# Environments: parsing and the defined outcome of invalid text
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("response,scheme,expected", [
    ("[action] turn left", "tag", "turn left"),
    ("I think... [action]  Turn Left. ", "tag", "turn left"),
    ("I think... \n[action]\tTurn Left.\n", "tag", "turn left"),
    ("[action] go forward\nextra words", "tag", "go forward\nextra words"),  # parse_env rejects it
    ("turn left", "tag", None),
    ("[action]   ", "tag", None),
    # two tags are two actions, and a tag glued to other text is not the tag: the lenient forms a policy
    # samples online (experiments/findings.md, session 32)
    ("[action] a [action] pick up", "tag", None),
    ("[action][action] +", "tag", None),
    ("[action] +[action] +", "tag", None),
    ("[[action] -", "tag", None),
    ("x[action] -", "tag", None),
    ('{"thoughts": "x", "action": "toggle"}', "json", "toggle"),
    ('{"action": "left", "action": "toggle"}', "json", None),
    ('{"action": toggle}', "json", None),
    ("", "json", None),
])
def test_parse_agent(response, scheme, expected):
    assert envs.parse_agent(response, scheme) == expected


def test_babyai_invalid_text_is_penalised_and_leaves_the_state_unchanged():
    env = envs.make_env("babyai", seed=3)
    before = (tuple(env.inner.agent_pos), env.inner.agent_dir, env.inner.step_count)
    obs, reward, terminated, truncated, info = env.step("[action] fly away")
    assert reward == -0.1 and not info["valid"] and not terminated and not truncated
    assert (tuple(env.inner.agent_pos), env.inner.agent_dir, env.inner.step_count) == before
    _, _, _, _, info = env.step("[action] turn left")
    assert info["valid"] and env.inner.agent_dir == (before[1] - 1) % 4


def test_babyai_a_step_into_a_wall_shows_the_same_observation_and_the_buffer_marks_it():
    """What --skip-unchanged rests on: a valid move that changes nothing leaves image and prompt as they
    were, so the next turn's observation tells the buffer."""
    env = envs.make_env("babyai")
    observations = [env.reset(seed=0)[0]]
    for _ in range(3):  # one step forward, then the wall
        observations.append(env.step("[action] go forward")[0])
    episode = make_episode(3, False)
    episode["images"] = torch.stack([torch.tensor(o["image"]) for o in observations[:3]])
    episode["prompts"] = [o["prompt"] for o in observations[:3]]
    batch = afsft.Buffer([episode]).collate([(0, 0, True), (0, 1, True), (0, 2, False)], [])
    assert batch["unchanged"].tolist() == [False, True, False]  # the last turn has no successor
    assert np.array_equal(observations[2]["image"], observations[3]["image"])


def test_babyai_episode_is_truncated_after_max_turns_of_garbage():
    env = envs.make_env("BabyAI-GoToRedBall-v0", seed=0, max_turns=5)
    flags = [env.step("nonsense")[3] for _ in range(5)]
    assert flags == [False] * 4 + [True]


def test_babyai_text_view_names_the_cell_in_front_then_objects_and_the_nearest_walls():
    env = envs.make_env("babyai", text_view=True)
    obs, _ = env.reset(seed=0)
    view = obs["prompt"].splitlines()[1]
    assert view == "In front of you: nothing. You see a purple key 2 steps right and 1 steps forward; " \
                   "a blue key 2 steps right; a wall 2 steps forward; a wall 2 steps left."
    obs, *_ = env.step("[action] go forward")
    assert "In front of you: a wall." in obs["prompt"] and "a wall 1 steps forward" in obs["prompt"]
    # going forward again: blocked
    assert "In front of you: a wall." in env.step("[action] go forward")[0]["prompt"]
    env.step("[action] turn right")  # the purple key is now 2 steps forward
    obs, *_ = env.step("[action] go forward")
    assert obs["prompt"].splitlines()[1].startswith("In front of you: a purple key. "
                                                    "You see a purple key 1 steps forward")


def test_babyai_passes_gymnasium_env_checker():
    check_env(envs.make_env("babyai"), skip_render_check=True)


def test_babyai_expert_solves_and_suboptimal_goes_to_a_decoy():
    env = envs.make_env("babyai")
    rng = np.random.default_rng(0)
    expert = [envs.collect_episode(env, "expert", rng, seed=s) for s in range(5)]
    decoy = [envs.collect_episode(env, "suboptimal", rng, seed=s, invalid_rate=0.0) for s in range(5)]
    assert all(ep["terminated"] and ep["rewards"].sum() > 0 for ep in expert)
    assert sum(ep["rewards"].sum() > 0 for ep in decoy) <= 1  # it may pass the ball by chance, rarely


@pytest.mark.slow
def test_make_env_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown env"):
        envs.make_env("chess")
    with pytest.raises(ValueError, match="unknown BabyAI level"):
        envs.make_env("BabyAI-NoSuchLevel-v0")


# ---------------------------------------------------------------------------
# The dataset contract: round trip and every validation error
# ---------------------------------------------------------------------------
def run_cli(*argv, script="afsft.py", timeout=600):
    return subprocess.run([sys.executable, os.path.join(HERE, script), *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=HERE)


def collect_dataset(folder, env, episodes):
    path = str(folder / "data.pt")
    result = run_cli("collect", "--env", env, "--policy", "mixed", "--episodes", str(episodes), "--out", path,
                     script="envs.py")
    assert result.returncode == 0, result.stderr
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return collect_dataset(tmp_path_factory.mktemp("data"), "babyai", 6)


@pytest.mark.slow
def test_dataset_round_trips(dataset):
    data = envs.load_dataset(dataset, "babyai")
    assert data["format"] == "afsft-v2" and len(data["episodes"]) == 6
    ep = data["episodes"][0]
    T = len(ep["actions"])
    assert len(ep["images"]) == T and ep["rewards"].shape == (T,) and len(ep["prompts"]) == T
    assert envs.turn_image(ep, T - 1).shape == (56, 56, 3)
    raw = torch.load(dataset, weights_only=True)  # the file needs no unpickling of code
    assert raw["episodes"][0]["actions"] == ep["actions"]


def test_a_v1_dataset_with_raw_pixels_still_loads_and_trains(dataset, tmp_path):
    data = envs.load_dataset(dataset)
    def raw_pixels(ep):
        return torch.from_numpy(np.stack([envs.turn_image(ep, t) for t in range(len(ep["actions"]))]))

    episodes = [{**ep, "images": raw_pixels(ep)} for ep in data["episodes"]]
    torch.save({"format": "afsft-v1", "env": "babyai", "episodes": episodes}, tmp_path / "v1.pt")
    v1 = envs.load_dataset(str(tmp_path / "v1.pt"), "babyai")
    batch = afsft.Buffer(v1["episodes"]).sample(np.random.default_rng(0), 4, 2)
    assert all(image.shape == (56, 56, 3) for image in batch["images"])
    gray = {"format": "afsft-v1", "env": "babyai",
            "episodes": [{**episodes[0], "images": episodes[0]["images"][..., 0]}]}
    torch.save(gray, tmp_path / "gray.pt")
    with pytest.raises(envs.DatasetError, match="episode 0: field 'images' must be a non-empty uint8 tensor"):
        envs.load_dataset(str(tmp_path / "gray.pt"))


def test_png_images_are_lossless():
    image = np.random.default_rng(0).integers(0, 256, (30, 20, 3), dtype=np.uint8)
    episode = envs.compress({"images": torch.from_numpy(image[None])})
    assert episode["images"][0].dtype == torch.uint8 and np.array_equal(envs.turn_image(episode, 0), image)


def test_a_huge_response_is_cut_to_max_new_tokens_in_seconds(tiny):
    agent, _ = tiny
    started = time.time()
    _, _, tokens, lengths = afsft.encode(agent.processor, [np.zeros((8, 8, 3), np.uint8)], ["p"],
                                         ["[action] go forward " * 60_000], max_response_tokens=24)
    assert lengths.tolist() == [24] and len(tokens) == 24 and time.time() - started < 10


class Hostile:
    def __reduce__(self):
        return (os.system, ("touch /tmp/afsft_pwned",))


def corrupt(data, change):
    data = {**data, "episodes": [{**ep, "images": list(ep["images"])} for ep in data["episodes"]]}
    change(data)
    return data


BAD_DATASETS = {
    "format tag": (lambda d: d.update(format="v0"), "format tag"),
    "env type": (lambda d: d.update(env=3), "'env' must be a string"),
    "zero episodes": (lambda d: d.update(episodes=[]), "non-empty list"),
    "missing field": (lambda d: d["episodes"][0].pop("rewards"), "episode 0: field 'rewards'"),
    "float images": (lambda d: d["episodes"][1]["images"].__setitem__(0, d["episodes"][1]["images"][0] * 1.0),
                     "episode 1: field 'images'"),
    "not a png": (lambda d: d["episodes"][0]["images"].__setitem__(0, torch.zeros(64, dtype=torch.uint8)),
                  "field 'images'"),
    "raw pixels tagged v2": (lambda d: d["episodes"][0].update(images=torch.zeros(2, 8, 8, 3).byte()),
                             "field 'images'"),
    "short prompts": (lambda d: d["episodes"][0].update(prompts=d["episodes"][0]["prompts"][:-1]),
                      "field 'prompts'"),
    "int actions": (lambda d: d["episodes"][0].update(actions=[1] * len(d["episodes"][0]["actions"])),
                    "field 'actions'"),
    "nan reward": (lambda d: d["episodes"][0]["rewards"].__setitem__(0, float("nan")), "NaN"),
    "bool flag": (lambda d: d["episodes"][0].update(terminated="yes"), "field 'terminated'"),
    "valid dtype": (lambda d: d["episodes"][0].update(valid=d["episodes"][0]["valid"].int()),
                    "field 'valid'"),
}


@pytest.mark.parametrize("name", sorted(BAD_DATASETS))
@pytest.mark.slow
def test_malformed_dataset_is_rejected_with_a_message(dataset, tmp_path, name):
    change, message = BAD_DATASETS[name]
    data = torch.load(dataset, weights_only=True)
    data["episodes"][0]["rewards"] = data["episodes"][0]["rewards"].clone()
    path = str(tmp_path / "bad.pt")
    torch.save(corrupt(data, change), path)
    with pytest.raises(envs.DatasetError, match=message):
        envs.load_dataset(path)


@pytest.mark.slow
def test_dataset_from_another_env_is_rejected(dataset):
    with pytest.raises(envs.DatasetError, match="collected on env 'babyai'"):
        envs.load_dataset(dataset, "BabyAI-GoToLocal-v0")


def test_hostile_pickle_is_never_run(tmp_path):
    if os.path.exists("/tmp/afsft_pwned"):
        os.remove("/tmp/afsft_pwned")
    path = str(tmp_path / "evil.pt")
    torch.save({"format": "afsft-v1", "payload": Hostile()}, path)
    with pytest.raises(envs.DatasetError, match="not a loadable afsft dataset"):
        envs.load_dataset(path)
    assert not os.path.exists("/tmp/afsft_pwned")


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated zip", b"not a torch file at all"])
@pytest.mark.slow
def test_truncated_or_foreign_file_gets_a_one_line_error_from_the_cli(tmp_path, content):
    path = tmp_path / "data.pt"
    path.write_bytes(content)
    result = run_cli("--offline", str(path), "--out", str(tmp_path / "run"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"afsft.py: error: {path}: "
                                                             "not a loadable afsft dataset")
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_cli_rejects_unknown_env_and_bad_flags(tmp_path, dataset):
    result = run_cli("--env", "chess", "--offline", dataset, "--out", str(tmp_path / "run"))
    assert (result.returncode != 0 and "unknown env 'chess'" in result.stderr
            and "Traceback" not in result.stderr)
    result = run_cli("--gamma", "1.5", "--offline", dataset)
    assert result.returncode == 2 and "--explore and --solved-replay must be in [0, 1]" in result.stderr
    result = run_cli("--solved-replay", "-0.1", "--offline", dataset)
    assert result.returncode == 2 and "--solved-replay must be in [0, 1]" in result.stderr
    result = run_cli("--online-lr", "0", "--offline", dataset)
    assert result.returncode == 2 and "--lr and --online-lr > 0" in result.stderr
    result = run_cli("--env", "babyai", "--out", str(tmp_path / "run"))
    assert result.returncode == 2 and "--offline needs a dataset" in result.stderr
    # an unknown env is named first, also without --offline
    result = run_cli("--env", "NoSuchEnv-v9")
    assert result.returncode == 2 and "unknown env 'NoSuchEnv-v9'" in result.stderr
    result = run_cli("--resume", str(tmp_path / "nowhere"), "--offline", dataset)
    assert result.returncode != 0 and "no checkpoint" in result.stderr and "Traceback" not in result.stderr



@pytest.mark.slow
def test_cli_refuses_a_missing_model_a_missing_gpu_and_overwriting_a_run(tmp_path, dataset):
    def one_line_error(result, message):
        lines = result.stderr.strip().splitlines()
        return result.returncode != 0 and "Traceback" not in result.stderr and message in lines[-1]

    run = tmp_path / "run"
    assert one_line_error(run_cli("--model", str(tmp_path / "no-model"), "--offline-steps", "0",
                                  "--out", str(run)), "cannot load it")
    if not torch.cuda.is_available():
        assert one_line_error(run_cli("--device", "cuda", "--offline-steps", "0", "--out", str(run)),
                              "sees no CUDA")
    data = envs.load_dataset(dataset)
    data["options"]["text_view"] = True
    torch.save(data, tmp_path / "text-view.pt")
    assert one_line_error(run_cli("--offline", str(tmp_path / "text-view.pt"), "--out", str(run)),
                          "was collected with text_view=True; pass the same flags here")
    assert not run.exists()  # a refused attempt leaves nothing behind
    (run / "checkpoint").mkdir(parents=True)
    assert one_line_error(run_cli("--offline", dataset, "--out", str(run)),
                          "already holds a run: continue it with --resume")
    # the first real mistake is named, before the existing --out: here a dataset of another env
    assert one_line_error(run_cli("--env", "numberline", "--offline", dataset, "--out", str(run)),
                          "collected on env 'babyai', but --env is 'numberline'")


# ---------------------------------------------------------------------------
# End to end through the CLI
# ---------------------------------------------------------------------------
SMALL = ["--batch-turns", "8", "--run-length", "4", "--num-envs", "2", "--rollout-len", "4",
         "--updates-per-round", "2", "--max-new-tokens", "8", "--log-every", "2"]


def test_episode_stats_of_finished_episodes():
    """What evaluate reports, and what online rounds log as rollout/...: by hand on two episodes."""
    episodes = [{"rewards": torch.tensor([0.0, 1.0]), "valid": torch.tensor([True, True])},
                {"rewards": torch.tensor([-0.1, -0.1, 0.0]), "valid": torch.tensor([False, False, True])}]
    stats = afsft.episode_stats(episodes, lambda episode_return: episode_return > 0.5)
    assert stats == {"success_rate": 0.5, "valid_action_rate": pytest.approx(3 / 5),
                     "valid_episode_rate": 0.5, "mean_return": pytest.approx((1.0 - 0.2) / 2), "episodes": 2}


def read_metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_offline_then_online_run_writes_the_run_directory(tmp_path, dataset):
    run = str(tmp_path / "run")
    result = run_cli("--env", "babyai", "--offline", dataset, "--out", run, "--offline-steps", "4",
                     "--online-rounds", "2", "--eval-episodes", "2", "--online-lr", "2e-4", *SMALL)
    assert result.returncode == 0, result.stderr[-3000:]
    state = torch.load(os.path.join(run, "checkpoint", "state.pt"), weights_only=True)
    assert {g["lr"] for g in state["optimizer"]["param_groups"]} == {2e-4}  # the online rounds' own rate
    with open(os.path.join(run, "eval.json")) as f:
        result = json.load(f)
    assert (set(result) == {"success_rate", "valid_action_rate", "valid_episode_rate", "mean_return",
                            "episodes"} and result["episodes"] == 2)
    metrics = read_metrics(run)
    assert [m["phase"] for m in metrics if "losses/total" in m] == ["offline", "offline", "online", "online"]
    assert all(key in metrics[0] for key in ("losses/total", "losses/actor", "losses/critic",
                                             "critic/kept", "critic/advantage_syntax",
                                             "critic/td_error", "charts/critic_grad_norm"))
    assert (os.path.exists(os.path.join(run, "checkpoint", "policy"))
            and os.path.exists(os.path.join(run, "checkpoint", "state.pt")))


@pytest.mark.slow
def test_resume_continues_the_step_counter(tmp_path, dataset):
    run = str(tmp_path / "run")
    # --save-buffer with no online episode yet writes no buffer, and the resume goes on without one
    first = run_cli("--offline", dataset, "--out", run, "--offline-steps", "4", "--eval-episodes", "0",
                    "--save-buffer", "--filter", "exp", "--beta", "3", *SMALL)
    assert first.returncode == 0, first.stderr[-3000:]
    assert not os.path.exists(os.path.join(run, "checkpoint", "buffer.pt"))
    # the flags not given again (--offline, --filter, --beta, --save-buffer, ...) are the run's own, not the
    # defaults
    second = run_cli("--resume", run, "--offline-steps", "8", "--lr", "3e-4")
    assert second.returncode == 0, second.stderr[-3000:]
    assert [m["step"] for m in read_metrics(run)] == [2, 4, 6, 8]
    state = torch.load(os.path.join(run, "checkpoint", "state.pt"), weights_only=True)
    assert state["step"] == 8 and state["args"]["offline_steps"] == 8
    # a flag given again wins, the learning rate too (the optimizer state loaded from the checkpoint holds the
    # old one)
    assert state["args"]["lr"] == 3e-4 and {g["lr"] for g in state["optimizer"]["param_groups"]} == {3e-4}
    assert (state["args"]["filter"], state["args"]["beta"], state["args"]["offline"]) == ("exp", 3.0, dataset)
    # the env's full id names the same env as its short name; another env is refused
    full_name = run_cli("--resume", run, "--env", "BabyAI-GoToRedBall-v0", "--offline-steps", "8")
    assert full_name.returncode == 0, full_name.stderr[-3000:]
    other = run_cli("--resume", run, "--env", "numberline", "--offline-steps", "0")
    assert (other.returncode != 0 and "that run used --env" in other.stderr
            and "Traceback" not in other.stderr)


@pytest.mark.slow
def test_resume_of_a_finished_run_says_so_and_logs_nothing_twice(tmp_path, dataset):
    run = str(tmp_path / "run")
    first = run_cli("--offline", dataset, "--out", run, "--offline-steps", "2", "--eval-episodes", "1",
                    *SMALL)
    assert first.returncode == 0, first.stderr[-3000:]
    logged = read_metrics(run)
    again = run_cli("--resume", run)
    assert again.returncode == 0 and "the run is finished (2 steps" in again.stderr
    assert "raise --offline-steps or --online-rounds" in again.stderr and read_metrics(run) == logged


def test_the_last_line_names_the_files_and_a_low_valid_rate_warns(tmp_path, monkeypatch, capsys):
    result = {"success_rate": 0.0, "valid_action_rate": 0.2, "mean_return": -1.0, "episodes": 1}
    monkeypatch.setattr(afsft, "evaluate", lambda *args: result)
    run = str(tmp_path / "run")
    afsft.main(["--env", "numberline", "--offline-steps", "0", "--eval-episodes", "1", "--out", run])
    out, err = capsys.readouterr()
    assert out.strip().splitlines()[-1] == f"wrote {run}: metrics.jsonl, checkpoint/, eval.json"
    assert "warning: the policy is not writing valid actions (0.20 of its turns)" in err
    assert json.load(open(os.path.join(run, "eval.json"))) == result


@pytest.mark.slow
def test_killed_run_resumes_without_losing_steps_or_episodes(tmp_path, dataset):
    run = str(tmp_path / "run")
    state_path = os.path.join(run, "checkpoint", "state.pt")
    flags = ["--offline", dataset, "--out", run, "--offline-steps", "2", "--save-every", "2", "--save-buffer",
             "--eval-episodes", "0", *SMALL, "--rollout-len", "40"]
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "afsft.py"), *flags,
                             "--online-rounds", "500"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=HERE)
    patience = 900  # seconds; about 30 s alone, far more on a machine busy with other runs
    saved_step, deadline = 0, time.time() + patience
    try:
        while time.time() < deadline and saved_step < 8:
            time.sleep(0.5)
            try:
                saved_step = torch.load(state_path, weights_only=True)["step"]
            except (FileNotFoundError, RuntimeError, EOFError):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert saved_step >= 8, f"in {patience} s the run saved only step {saved_step}"
    saved = torch.load(state_path, weights_only=True)
    saved_episodes = envs.load_dataset(os.path.join(run, "checkpoint", "buffer.pt"))["episodes"] \
        if os.path.exists(os.path.join(run, "checkpoint", "buffer.pt")) else []
    rounds = (saved["step"] - 2) // 2 + 3  # three rounds past the checkpoint
    result = run_cli("--resume", run, *flags, "--online-rounds", str(rounds))
    assert result.returncode == 0, result.stderr[-3000:]
    final = torch.load(state_path, weights_only=True)
    assert final["step"] == saved["step"] + 6
    steps = [m["step"] for m in read_metrics(run)]
    assert steps == sorted(set(steps)) and steps[-1] == final["step"]
    resumed_episodes = envs.load_dataset(os.path.join(run, "checkpoint", "buffer.pt"))["episodes"]
    assert len(saved_episodes) > 0 and len(resumed_episodes) >= len(saved_episodes)
    assert ([ep["actions"] for ep in resumed_episodes[:len(saved_episodes)]]
            == [ep["actions"] for ep in saved_episodes])


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tmp_path, dataset):
    run = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "afsft.py"), "--offline", dataset,
                             "--out", run, "--offline-steps", "100000", "--log-every", "1",
                             "--eval-episodes", "0", *SMALL[:-2]],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=HERE)
    deadline = time.time() + 300
    while time.time() < deadline and not (os.path.exists(os.path.join(run, "metrics.jsonl"))
                                          and len(read_metrics(run)) >= 3):
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode != 0 and "Traceback" not in stderr, stderr[-2000:]
    assert "afsft.py: error: interrupted; checkpoint saved at step" in stderr and f"--resume {run}" in stderr
    assert torch.load(os.path.join(run, "checkpoint", "state.pt"), weights_only=True)["step"] >= 3


@pytest.mark.slow
def test_non_finite_loss_skips_the_batch_and_never_reaches_the_weights(tmp_path, dataset, monkeypatch,
                                                                        capsys):
    real, calls = afsft.afsft_loss, []

    def poisoned(*args, **kwargs):  # steps 1 and 2 get a NaN and an inf loss
        loss, stats = real(*args, **kwargs)
        calls.append(len(calls))
        return (loss * {0: float("nan"), 1: float("inf")}.get(calls[-1], 1.0)), stats

    monkeypatch.setattr(afsft, "afsft_loss", poisoned)
    run = str(tmp_path / "run")
    afsft.main(["--offline", dataset, "--out", run, "--offline-steps", "4", "--eval-episodes", "0",
                *SMALL[:-2], "--log-every", "1"])
    assert "non-finite loss nan, batch skipped" in capsys.readouterr().err
    assert [m.get("charts/skipped", False) for m in read_metrics(run)] == [True, True, False, False]
    state = torch.load(os.path.join(run, "checkpoint", "state.pt"), weights_only=True)
    from safetensors.torch import load_file
    policy = load_file(os.path.join(run, "checkpoint", "policy", "adapter_model.safetensors"))  # LoRA
    tensors = [*state["critic"].values(), *state["target"].values(), *policy.values()]
    assert tensors and all(torch.isfinite(t.float()).all() for t in tensors)


@pytest.mark.slow
def test_the_critic_trains_the_trunk_on_the_online_rounds_only(tmp_path, dataset, monkeypatch):
    """Offline the critic head reads detached features (--critic-trunk none); online, where it decides the
    filter alone, its loss trains the trunk (--online-critic-trunk valid); the run saves its own flags."""
    real, trunks = afsft.afsft_loss, []

    def recording(agent, batch, args, warmup, device):
        trunks.append(args.critic_trunk)
        return real(agent, batch, args, warmup, device)

    monkeypatch.setattr(afsft, "afsft_loss", recording)
    run = str(tmp_path / "run")
    afsft.main(["--offline", dataset, "--out", run, "--offline-steps", "2", "--online-rounds", "1",
                "--eval-episodes", "0", *SMALL])
    assert trunks == ["none", "none", "valid", "valid"]  # 2 offline steps, then 1 round of 2 updates
    state = torch.load(os.path.join(run, "checkpoint", "state.pt"), weights_only=True)
    assert state["args"]["critic_trunk"] == "none" and state["args"]["online_critic_trunk"] == "valid"


class SeedLengthEnv:
    """Odd seeds win on the first turn; even seeds time out after 5 turns of no reward."""
    observation = {"image": np.zeros((8, 8, 3), np.uint8), "prompt": "p"}

    def reset(self, seed):
        self.seed, self.turn = seed, 0
        return self.observation, {}

    def step(self, response):
        self.turn += 1
        won = self.seed % 2 == 1
        return self.observation, float(won), won, self.turn == 5, {"valid": True}

    def success(self, episode_return):
        return episode_return > 0

    def close(self):
        pass


def test_evaluate_scores_exactly_the_held_out_seeds_however_long_their_episodes(monkeypatch):
    # finishing order favours the short (here: winning) episodes; taking the first N to finish would say 1.0
    monkeypatch.setattr(afsft, "make_env", lambda args: SeedLengthEnv())
    monkeypatch.setattr(afsft, "generate", lambda agent, images, *rest: ["x"] * len(images))
    agent = torch.nn.Linear(1, 1)
    result = afsft.evaluate(agent, afsft.Args(num_envs=4), episodes=8, device="cpu", seed=10)
    assert result["success_rate"] == 0.5 and result["mean_return"] == 0.5 and result["episodes"] == 8


def test_training_never_plays_the_evaluation_seeds(monkeypatch):
    # the block is skipped one-to-one, and the seeds below it are as they were
    assert [envs.training_seed(n) for n in (0, 999_999, 10**6, 10**6 + 49)] == [0, 999_999, 2 * 10**6,
                                                                               2 * 10**6 + 49]
    # a dataset of --seed 10 starts inside the block (10 * 100_003); it must not hold an evaluated episode
    played, collect_episode = [], envs.collect_episode
    monkeypatch.setattr(envs, "collect_episode", lambda *a, seed, **kw: played.append(seed)
                        or collect_episode(*a, seed=seed, **kw))
    envs.collect(types.SimpleNamespace(env="numberline", scheme="tag", text_view=False, policy="random",
                                       seed=10, episodes=25, invalid_rate=0.2, expert_fraction=0.3))
    assert len(played) == 25 and not set(played) & set(range(envs.EVAL_SEED, envs.EVAL_SEED + 50))
    # online rollouts skip it too; the evaluation plays exactly its seeds
    monkeypatch.setattr(afsft, "make_env", lambda args: SeedLengthEnv())
    args = afsft.Args(num_envs=2)
    assert afsft.Rollout(args, seed=envs.EVAL_SEED - 1).episode_seeds == [envs.EVAL_SEED - 1, 2 * 10**6]
    assert afsft.Rollout(args, envs.EVAL_SEED - 1, held_out=True).episode_seeds == [envs.EVAL_SEED - 1,
                                                                                   envs.EVAL_SEED]


@pytest.mark.slow
def test_same_seed_gives_the_same_losses(tmp_path, dataset):
    losses = []
    for name in ("a", "b"):
        run = str(tmp_path / name)
        result = run_cli("--offline", dataset, "--out", run, "--offline-steps", "4", "--eval-episodes", "0",
                         "--sft-warmup", "0.5", "--log-every", "1", *SMALL[:-2])
        assert result.returncode == 0, result.stderr[-3000:]
        losses.append([(m["losses/actor"], m["losses/critic"]) for m in read_metrics(run)])
    assert len(losses[0]) == 4 and losses[0] == losses[1]


@pytest.mark.slow
def test_results_table_runs_every_column_then_skips_what_finished(tmp_path):
    cell = ["--domains", "numberline", "--datasets", "random", "--seeds", "1", "--methods", "prompted,sft",
            "--offline-steps", "2", "--episodes", "4", "--eval-episodes", "1", "--out", str(tmp_path),
            "--table", str(tmp_path / "results.md")]
    script = os.path.join("experiments", "results.py")
    first = run_cli(*cell, script=script)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "train numberline/seed0/prompted" in first.stdout
    assert "train numberline/random/seed0/sft" in first.stdout
    lines = (tmp_path / "results.md").read_text().splitlines()
    row = [line for line in lines if line.startswith("| NumberLine")]
    # task, dataset, seeds, the dataset, prompted base, SFT, expert (on the evaluation's episode), RL4VLM
    assert len(row) == 1 and row[0].count("|") == 9 and row[0].split("|")[7].strip() == "1.00"
    again = run_cli(*cell, script=script)
    assert again.returncode == 0 and "train " not in again.stdout and "collect " not in again.stdout


# ---------------------------------------------------------------------------
# The other domains: gym_cards and MiniWoB++ (the MiniWoB tests skip, saying
# what to install, where Chromium is missing)
# ---------------------------------------------------------------------------
CARDS = ["numberline", "ezpoints", "points24", "blackjack"]


def act(env, text, scheme="tag"):
    """Step with a response that carries `text` as its action."""
    return env.step(envs.format_response(text, scheme))


def checked(env):
    with warnings.catch_warnings():
        # no registry spec: made by make_env
        warnings.filterwarnings("ignore", message=".*(render fps|spec).*")
        check_env(env)


# ---------------------------------------------------------------------------
# gym_cards: the text interface
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", CARDS)
@pytest.mark.parametrize("scheme", ["tag", "json"])
def test_cards_parse_valid_near_valid_and_garbage(name, scheme):
    env = envs.make_env(name, seed=0, scheme=scheme)
    for index, word in enumerate(env.action_words):
        assert env.parse_env(word) == index
    near = {"tag": "I think so.\n[action]  {}. ", "json": '{{"thoughts": "ok", "action": " {} "}}'}[scheme]
    garbage = ["", "plus", "1 + 2", "hit me", "11", "+-", "[action]", '{"action": 3}', "stand\n[action]"]
    for word in env.action_words:
        env.reset(seed=0)
        assert env.step(near.format(word.upper()))[-1]["valid"], word
    for text in garbage:
        env.reset(seed=0)
        obs, reward, terminated, truncated, info = env.step(text)
        assert not info["valid"] and reward == -env.invalid_penalty and not terminated, text


def test_invalid_text_leaves_the_state_unchanged():
    env = envs.make_env("ezpoints", seed=1)
    before = env.observe()
    act(env, "plus")
    assert env.formula == [] and np.array_equal(env.observe()["image"], before["image"])
    assert env.observe()["prompt"] == before["prompt"]


@pytest.mark.parametrize("name", CARDS)
def test_cards_images_and_seeding(name):
    env = envs.make_env(name)
    first = env.reset(seed=7)[0]
    assert first["image"].shape == (300, 300, 3) and first["image"].dtype == np.uint8
    assert np.array_equal(env.reset(seed=7)[0]["image"], first["image"])
    assert any(not np.array_equal(env.reset(seed=s)[0]["image"], first["image"]) for s in range(8, 20))


@pytest.mark.parametrize("name", CARDS)
def test_cards_pass_check_env(name):
    checked(envs.make_env(name))


def test_text_view_states_the_picture_in_words():
    env = envs.make_env("numberline", text_view=True)
    env.reset(seed=0)
    env.position, env.target = 1, 4
    assert "Target: 4. Current: 1." in env.prompt()
    assert "Target" not in envs.make_env("numberline", seed=0).prompt()


# ---------------------------------------------------------------------------
# gym_cards: the rules, on hand-built states
# ---------------------------------------------------------------------------
def test_numberline_rules():
    env = envs.make_env("numberline", seed=0)
    env.position, env.target = 2, 4
    assert act(env, "-")[1:4] == (-1.0, False, False)  # further away
    assert act(env, "+")[1:4] == (0.0, False, False)  # closer
    assert act(env, "+")[1:4] == (0.0, False, False)
    obs, reward, terminated, truncated, info = act(env, "+")
    assert (reward, terminated, info["solved"]) == (1.0, True, True)
    env.reset(seed=0)
    env.position, env.target = 0, 3
    assert act(env, "-")[1] == -1.0 and env.position == 0  # at the edge: no move, same distance
    for turn in range(2, 11):
        obs, reward, terminated, truncated, info = act(env, "-")
    assert truncated and not terminated and env.turn == 10


def test_numberline_numbers_cover_many_of_the_tiny_models_patches():
    """Drawn at upstream's 36 px a digit changed 2 of the 49 patches a 112x112, 16-px-patch model sees, and
    SFT on perfect data stayed at chance; each number must change several patches."""
    from PIL import Image

    env = envs.make_env("numberline", seed=0)

    def changed_patches(before, after):  # (target, position) pairs -> the 7x7 patches whose pixels change
        views = []
        for target, position in (before, after):
            env.target, env.position = target, position
            small = Image.fromarray(env.image()).resize((112, 112), Image.BICUBIC)
            views.append(np.asarray(small, dtype=int))
        return (np.abs(views[0] - views[1]).max(-1) > 64).reshape(7, 16, 7, 16).any((1, 3))

    changed = changed_patches((1, 0), (4, 0))
    assert changed.sum() >= 6 and changed[:, :3].sum() == changed.sum()  # the target only, on its side
    changed = changed_patches((1, 0), (1, 5))
    assert changed.sum() >= 6 and changed[:, 4:].sum() == changed.sum()


def test_numberline_reset_never_starts_on_the_target():
    env = envs.make_env("numberline")
    for seed in range(200):
        env.reset(seed=seed)
        assert env.position != env.target and 0 <= env.target <= 5 and 0 <= env.position <= 5


def test_ezpoints_rules():
    env = envs.make_env("ezpoints", seed=0)
    env.cards = [(4, 0), (3, 2)]
    assert [act(env, t)[1] for t in ["4", "*", "3"]] == [0.0, 0.0, 0.0]
    obs, reward, terminated, truncated, info = act(env, "=")
    assert (reward, terminated, info["solved"]) == (10.0, True, True)
    assert "Formula: 4 * 3" in obs["prompt"]
    env.reset(seed=0)
    env.cards = [(13, 0), (2, 1)]  # a king counts as 10
    assert act(env, "5")[1] == -1.0 and env.formula == [" "]  # not held: a blank, -1, no end
    assert act(env, "10")[1] == 0.0 and act(env, "10")[1] == -1.0  # held once, played twice
    assert act(env, "=")[1:3] == (-1.0, True)  # "10" alone is not 12
    env.reset(seed=0)
    env.cards = [(13, 0), (2, 1)]
    for token in ["10", "+", "2", "+", "+"]:
        assert act(env, token)[2:4] == (False, False)
    assert act(env, "+")[1:4] == (-1.0, False, True)  # six tokens: too long


def test_ezpoints_deal_is_always_solvable():
    env = envs.make_env("ezpoints")
    for seed in range(200):
        env.reset(seed=seed)
        a, b = env.numbers()
        assert a + b == 12 or a * b == 12


def test_points24_rules():
    env = envs.make_env("points24", seed=0)
    env.cards = [(8, 0), (3, 1), (8, 2), (3, 3)]
    for token in ["8", "/", "(", "3", "-", "8", "/", "3", ")"]:  # exact arithmetic: 8/(3-8/3) = 24
        act(env, token)
    assert act(env, "=")[1:3] == (10.0, True)
    env.reset(seed=0)
    env.cards = [(6, 0), (4, 1), (1, 2), (1, 3)]
    for token in ["6", "*", "4"]:
        act(env, token)
    assert act(env, "=")[1:3] == (-1.0, True)  # 24, but not all four cards
    env.reset(seed=0)
    env.cards = [(1, 0), (2, 1), (2, 2), (1, 3)]
    for token in ["1", "2", "*", "2", "*", "1"]:
        act(env, token)
    assert act(env, "=")[1] == -1.0  # two numbers in a row are not the number 12


def test_evaluate_and_the_solver():
    assert envs.evaluate(["8", "/", "(", "3", "-", "8", "/", "3", ")"]) == Fraction(24)
    assert envs.evaluate(["-", "2", "+", "3"]) == 1  # Python's unary minus
    for bad in [["1", "2"], ["(", "3"], ["3", "/", "(", "2", "-", "2", ")"], [" "], []]:
        assert envs.evaluate(bad) is None
    found = [t for t, v in envs.expressions([3, 3, 8, 8], {"+", "-", "*", "/"}) if v == 24]
    assert found and all(envs.evaluate(t) == 24 for t in found)


def test_blackjack_rules(monkeypatch):
    assert envs.hand_total([(1, 0), (6, 0)]) == (17, True)
    assert envs.hand_total([(1, 0), (6, 0), (12, 0)]) == (17, False)
    env = envs.make_env("blackjack", seed=0)

    def play(player, dealer, draws, action):
        env.reset(seed=0)
        env.player, env.dealer = [(r, 0) for r in player], [(r, 1) for r in dealer]
        cards = iter(draws)
        with monkeypatch.context() as m:
            m.setattr(env, "deal", lambda: (next(cards), 2))  # the cards drawn next
            return act(env, action)

    assert play([10, 9], [10, 7], [], "stand")[1:3] == (1.0, True)  # 19 beats 17
    assert play([10, 8], [10, 8], [], "stand")[1:3] == (0.0, True)  # a draw
    assert play([10, 4], [10, 6], [5], "stand")[1:3] == (-1.0, True)  # the dealer draws to 21
    assert play([10, 4], [10, 6], [13], "stand")[1:3] == (1.0, True)  # the dealer busts
    assert play([10, 6], [10, 6], [13], "hit")[1:3] == (-1.0, True)  # the player busts
    assert play([10, 6], [10, 6], [3], "hit")[1:3] == (0.0, False)
    assert play([1, 9], [10, 7], [], "stand")[-1]["solved"]  # soft 20 wins


# ---------------------------------------------------------------------------
# gym_cards: the scripted policies
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("name, least", [("numberline", 1.0), ("ezpoints", 1.0), ("points24", 0.5),
                                         ("blackjack", 0.25)])
def test_cards_expert_success(name, least):
    env, rng = envs.make_env(name), np.random.default_rng(0)
    episodes = [envs.collect_episode(env, "expert", rng, seed=s) for s in range(40)]
    assert np.mean([env.success(float(ep["rewards"].sum())) for ep in episodes]) >= least


def test_blackjack_expert_follows_basic_strategy():
    env = envs.make_env("blackjack", seed=0)
    for player, up, action in [([10, 6], 7, "hit"), ([10, 6], 6, "stand"), ([10, 2], 3, "hit"),
                               ([10, 2], 4, "stand"), ([1, 7], 9, "hit"), ([1, 7], 8, "stand"),
                               ([10, 7], 1, "stand"), ([5, 6], 6, "hit")]:
        env.player, env.dealer = [(r, 0) for r in player], [(up, 0), (10, 0)]
        assert env.action_words[env.expert_action()] == action, (player, up)


def test_suboptimal_mistakes_are_consistent():
    env = envs.make_env("ezpoints", seed=0)
    env.cards = [(2, 0), (10, 1)]
    played = []
    while not played or played[-1] != "=":
        played.append(env.action_words[env.suboptimal_action()])
        act(env, played[-1])
    assert played == ["2", "*", "10", "="]  # always multiplies
    env = envs.make_env("numberline", seed=0)
    env.position, env.target = 3, 1
    assert env.action_words[env.suboptimal_action()] == "+"  # always '+'


def test_expert_continues_a_formula_or_gives_up():
    env = envs.make_env("points24", seed=0)
    env.cards = [(8, 0), (3, 1), (8, 2), (3, 3)]
    env._solutions = None
    assert env.action_words[env.expert_action()] in {"8", "("}
    env.formula = ["3", "+"]  # no formula for 24 starts with 3 +
    assert env.action_words[env.expert_action()] == "="


@pytest.mark.parametrize("name, scheme", [("numberline", "tag"), ("ezpoints", "json"), ("points24", "tag"),
                                          ("blackjack", "json")])
def test_cards_collect_round_trip(name, scheme, tmp_path):
    out = str(tmp_path / "data.pt")
    envs.main(["collect", "--env", name, "--policy", "mixed", "--episodes", "4", "--scheme", scheme,
               "--out", out])
    data = envs.load_dataset(out, env_name=name)
    assert data["env"] == name and len(data["episodes"]) == 4
    assert envs.turn_image(data["episodes"][0], 0).shape == (300, 300, 3)


@pytest.mark.slow
def test_make_env_names():
    assert isinstance(envs.make_env("gym_cards/Points24-v0"), envs.Points24)
    with pytest.raises(ValueError, match="unknown env"):
        envs.make_env("cards")


# ---------------------------------------------------------------------------
# MiniWoB++ (skips without Chromium)
# ---------------------------------------------------------------------------
def miniwob_env(task):
    try:
        return envs.make_env(f"miniwob/{task}-v1")
    except envs.MissingDependency as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def click_test_2():
    env = miniwob_env("click-test-2")
    yield env
    env.close()


def test_missing_browser_says_what_to_install(monkeypatch):
    pytest.importorskip("miniwob")
    monkeypatch.delenv("MINIWOB_CHROME_BINARY", raising=False)
    monkeypatch.delenv("MINIWOB_CHROMEDRIVER", raising=False)
    monkeypatch.setattr(envs.shutil, "which", lambda name: None)
    with pytest.raises(envs.MissingDependency, match="apt-get install chromium chromium-driver"):
        envs.make_env("miniwob")


@pytest.mark.slow
def test_miniwob_parser(click_test_2):
    env = click_test_2
    env.reset(seed=0)
    refs = [e["ref"] for e in env.elements()]
    for ref in refs:
        assert env.parse_env(f"click(ref={ref})") is not None
    for near in ["I will click it.\n[action] Click( REF = {} ).", "[action]click(ref={})  "]:
        assert env.parse_env(envs.parse_agent(near.format(refs[0]))) is not None, near
    assert env.parse_env("click(x=40, y=100)") is not None and env.parse_env("click(x=160,y=210)") is not None
    for garbage in [None, "click(ref=999)", "click(ref=-1)", "click(x=161, y=5)", "click(4)", "tap(ref=4)",
                    "click(ref=4) click(ref=5)", "click(x=-3, y=5)"]:
        assert env.parse_env(garbage) is None, garbage


@pytest.mark.slow
def test_miniwob_rules_timer_and_turn_cap(click_test_2):
    env = click_test_2
    obs, _ = env.reset(seed=0)
    assert obs["image"].shape == (210, 160, 3) and "Task: Click button" in obs["prompt"]
    assert env.inner.instance.driver.execute_script("return core.EPISODE_MAX_TIME;") == 1000000
    obs, reward, terminated, truncated, info = act(env, env.action_words[env.expert_action()])
    assert (reward, terminated, info["solved"]) == (1.0, True, True)
    env.reset(seed=0)
    obs, reward, terminated, truncated, info = act(env, env.action_words[env.suboptimal_action()])
    assert (reward, terminated, info["solved"]) == (-1.0, True, False)  # the other button
    env.reset(seed=0)
    results = [act(env, "no idea") for _ in range(5)]
    assert [r[3] for r in results] == [False] * 4 + [True] and not any(r[2] for r in results)


@pytest.mark.slow
def test_miniwob_click_by_coordinates(click_test_2):
    env = click_test_2
    env.reset(seed=0)
    target = env.elements()[env.expert_action()]
    x, y = (int(target[k].item() + target[s].item() / 2) for k, s in (("left", "width"), ("top", "height")))
    assert act(env, f"click(x={x}, y={y})")[1] == 1.0


@pytest.mark.slow
def test_miniwob_check_env_and_collect_round_trip(click_test_2, tmp_path):
    checked(click_test_2)
    rng = np.random.default_rng(0)
    episodes = [envs.collect_episode(click_test_2, "mixed", rng, seed=s) for s in range(3)]
    path = str(tmp_path / "data.pt")
    envs.save_dataset(path, "miniwob", episodes)
    data = envs.load_dataset(path, env_name="miniwob/click-test-2-v1")
    assert envs.turn_image(data["episodes"][0], 0).shape == (210, 160, 3)


@pytest.mark.parametrize("task", ["click-test", "click-button", "click-link", "click-dialog"])
@pytest.mark.slow
def test_miniwob_expert_solves_easy_tasks(task):
    env = miniwob_env(task)
    try:
        rng = np.random.default_rng(0)
        assert all(envs.collect_episode(env, "expert", rng, seed=s)["rewards"].sum() == 1 for s in range(2))
    finally:
        env.close()


@pytest.mark.parametrize("name", CARDS + ["miniwob"])
@pytest.mark.slow
def test_every_domain_trains_through_the_cli(name, tmp_path):
    if name == "miniwob":
        miniwob_env("click-test-2").close()  # skips with the install hint where Chromium is missing
    data, run = str(tmp_path / "data.pt"), str(tmp_path / "run")
    result = run_cli("collect", "--env", name, "--policy", "mixed", "--episodes", "4", "--out", data,
                     script="envs.py")
    assert result.returncode == 0, result.stderr[-3000:]
    result = run_cli("--env", name, "--offline", data, "--out", run, "--offline-steps", "2",
                     "--online-rounds", "1", "--eval-episodes", "1", *SMALL)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(run, "eval.json")) as f:
        assert json.load(f)["episodes"] == 1


@pytest.mark.slow
def test_miniwob_browser_death_truncates_the_episode_and_restarts_it():
    env = miniwob_env("click-test-2")
    try:
        obs, _ = env.reset(seed=0)
        env.inner.instance.driver.quit()  # the browser dies under the env
        obs2, reward, terminated, truncated, info = env.step("[action] "
                                                             + env.action_words[env.expert_action()])
        assert (reward, terminated, truncated) == (0.0, False, True) and obs2["prompt"] == obs["prompt"]
        obs, _ = env.reset(seed=1)  # a new browser
        assert act(env, env.action_words[env.expert_action()])[1] == 1.0
        env.inner.instance.driver.quit()
        assert env.reset(seed=2)[0]["prompt"].startswith("Task:")  # death found on reset: restarted too
    finally:
        env.close()


@pytest.mark.slow
def test_a_browser_that_keeps_dying_stops_the_run_cleanly_with_a_checkpoint(tmp_path, dataset, monkeypatch):
    env = miniwob_env("click-test-2")
    env.inner.instance.driver.quit()
    monkeypatch.setattr(env, "restart_browser", lambda err: None)  # a restart that does not help
    with pytest.raises(envs.BrowserDied, match="died again right after a restart"):
        env.reset(seed=0)

    def dying(*args, **kwargs):
        raise envs.BrowserDied("miniwob/click-test-2: the browser died again right after a restart")
    monkeypatch.setattr(afsft.Rollout, "step", dying)
    run = str(tmp_path / "run")
    with pytest.raises(SystemExit, match="checkpoint saved at step 2, continue with --resume"):
        afsft.main(["--offline", dataset, "--out", run, "--offline-steps", "2", "--online-rounds", "2",
                    "--eval-episodes", "0", *SMALL])
    assert torch.load(os.path.join(run, "checkpoint", "state.pt"), weights_only=True)["step"] == 2


# ---------------------------------------------------------------------------
# Bring your own VLM: tiny random models of four real families, each with its
# own processor class and chat template, saved and loaded like a hub model;
# the GPU flags; and torchrun
# ---------------------------------------------------------------------------
FAMILY_TEMPLATES = {  # the families' chat templates, cut down to one image and text per message
    "llava": "{% for m in messages %}{{ m['role'].upper() + ': ' }}{% for c in m['content'] %}"
             "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] + ' ' }}{% endif %}{% endfor %}"
             "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}",
    "idefics3": "<|im_start|>{% for m in messages %}{{ m['role'] | capitalize }}"
                "{% if m['content'][0]['type'] == 'image' %}:{% else %}: {% endif %}"
                "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% else %}<image>"
                "{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
                "{% if add_generation_prompt %}Assistant:{% endif %}",
    "qwen2_vl": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}"
                "{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
}
FAMILY_END = {"llava": "</s>", "idefics3": "<end_of_utterance>", "qwen2_vl": "<|im_end|>",
              "paligemma": "<eos>"}
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


def family_tokenizer(corpus, specials, eos, bos=None, adds_bos=False):
    """A byte-level BPE fitted to `corpus` with the family's special tokens; Llama's adds BOS itself."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                        show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if adds_bos:
        bpe.post_processor = processors.TemplateProcessing(single=f"{bos} $A",
                                                           special_tokens=[(bos, bpe.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=bos, eos_token=eos, pad_token=specials[0])


def build_family(family, corpus, path, side=32):
    """A random model of the family's real architecture (2 layers, width 32-64, 8 px patches on `side` px
    images) and its real processor class with the PIL image processor, saved to `path`."""
    import transformers as T

    text = dict(vocab_size=0, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=side, patch_size=8)
    # LLaVA-1.5: CLIP tower, Llama, "USER: <image>\n... ASSISTANT:", a tokenizer that adds <s>
    if family == "llava":
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
        tok = family_tokenizer(corpus, ["<pad>", "<s>", "</s>", "<image>"], "</s>", bos="<s>", adds_bos=True)
        processor = T.LlavaProcessor(CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size=side), tok,
                                     patch_size=8, vision_feature_select_strategy="default",
                                     num_additional_image_tokens=1, chat_template=FAMILY_TEMPLATES[family])
        config = T.LlavaConfig(vision_config=T.CLIPVisionConfig(**vision, projection_dim=32),
                               text_config=T.LlamaConfig(**{**text, "vocab_size": len(tok)}, pad_token_id=0),
                               image_token_id=tok.convert_tokens_to_ids("<image>"))
    # SmolVLM: SigLIP-like tower, pixel shuffle, Llama; the template writes the BOS
    elif family == "idefics3":
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
        tok = family_tokenizer(corpus, ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<image>",
                                        "<fake_token_around_image>", "<global-img>"], "<end_of_utterance>",
                               bos="<|im_start|>")
        image_processor = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": side},
                                                    max_image_size={"longest_edge": side})
        processor = T.Idefics3Processor(image_processor, tok, image_seq_len=(side // 8) ** 2 // 4,
                                        chat_template=FAMILY_TEMPLATES[family])
        config = T.Idefics3Config(vision_config=vision,
                                  text_config=T.LlamaConfig(**{**text, "vocab_size": len(tok)},
                                                            pad_token_id=0),
                                  image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=2)
    # Qwen2-VL: its own tower, M-RoPE, ChatML; EOS <|endoftext|> as in the base checkpoint
    elif family == "qwen2_vl":
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
        tok = family_tokenizer(corpus, ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                                        "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"], "<|endoftext|>")
        image_processor = Qwen2VLImageProcessorPil(patch_size=8, merge_size=2, temporal_patch_size=2,
                                                   min_pixels=side ** 2, max_pixels=side ** 2)
        ids = {key: tok.convert_tokens_to_ids(f"<|{name}|>") for key, name in [
            ("image_token_id", "image_pad"), ("video_token_id", "video_pad"),
            ("vision_start_token_id", "vision_start"), ("vision_end_token_id", "vision_end")]}
        config = T.Qwen2VLConfig(
            vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=8),
            text_config=T.Qwen2VLTextConfig(**{**text, "vocab_size": len(tok)}, pad_token_id=0,
                                            bos_token_id=None, eos_token_id=0,
                                            rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                             "mrope_section": [2, 3, 3]}),
            **ids)
        if HAS_TORCHVISION:
            processor = T.Qwen2VLProcessor(image_processor, tok,
                                           T.Qwen2VLVideoProcessor(patch_size=8, merge_size=2),
                                           chat_template=FAMILY_TEMPLATES[family])
        # transformers 5 cannot build Qwen2VLProcessor (its video half) without torchvision: save its parts
        else:
            processor = None
            tok.save_pretrained(path)
            image_processor.save_pretrained(path)
            with open(os.path.join(path, "processor_config.json"), "w") as f:
                json.dump({"processor_class": "Qwen2VLProcessor"}, f)
            with open(os.path.join(path, "chat_template.jinja"), "w") as f:
                f.write(FAMILY_TEMPLATES[family])
    # PaliGemma: SigLIP, Gemma, tied embeddings, no chat template (prefix + suffix)
    elif family == "paligemma":
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
        tok = family_tokenizer(corpus, ["<pad>", "<eos>", "<bos>", "<image>"], "<eos>", bos="<bos>")
        image_processor = SiglipImageProcessorPil(size={"height": side, "width": side})
        image_processor.image_seq_length = (side // 8) ** 2
        # adds its 1152 <loc>/<seg> tokens to the vocabulary
        processor = T.PaliGemmaProcessor(image_processor, tok)
        config = T.PaliGemmaConfig(vision_config=dict(model_type="siglip_vision_model", **vision),
                                   text_config=dict(model_type="gemma", **{**text, "vocab_size": len(tok)},
                                                    head_dim=16, pad_token_id=0),
                                   image_token_index=tok.convert_tokens_to_ids("<image>"),
                                   vocab_size=len(tok), projection_dim=64, hidden_size=64)
    torch.manual_seed(0)
    T.AutoModelForImageTextToText.from_config(config).save_pretrained(path)
    if processor is not None:
        processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def numberline_data(tmp_path_factory):
    return collect_dataset(tmp_path_factory.mktemp("numberline"), "numberline", 4)


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    env = envs.make_env("numberline")
    corpus = [env.reset(seed=seed)[0]["prompt"] for seed in range(20)]
    corpus += [envs.format_response(a) for a in env.action_words] * 3
    return {name: build_family(name, corpus, str(tmp_path_factory.mktemp(name))) for name in FAMILY_END}


def stub_qwen2_vl_video_processor(monkeypatch, path):
    """Without torchvision, transformers 5 cannot build Qwen2VLProcessor's video half. Stub out that half
    (videos are never used) so that the rest of the Qwen2-VL path can run in-process."""
    import transformers
    from transformers import processing_utils

    stub = type("VideoProcessorMixin", (), {})
    monkeypatch.setattr(processing_utils.transformers_module, "VideoProcessorMixin", stub, raising=False)
    processor = transformers.Qwen2VLProcessor(transformers.AutoImageProcessor.from_pretrained(path),
                                              transformers.AutoTokenizer.from_pretrained(path), stub(),
                                              chat_template=FAMILY_TEMPLATES["qwen2_vl"])
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", lambda *args, **kwargs: processor)


@pytest.mark.parametrize("family", list(FAMILY_END))
@pytest.mark.slow
def test_family_lora_heads_and_encoding(family, families, monkeypatch):
    if family == "qwen2_vl" and not HAS_TORCHVISION:
        stub_qwen2_vl_video_processor(monkeypatch, families[family])
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(0)
    agent = afsft.load_agent(afsft.Args(finetune="lora", lora_rank=2, critic_rank=4, critic_init="lm"),
                             families[family])
    # LoRA on every linear layer of the language model (2 layers x q k v o gate up down) and on its language
    # head, nowhere else
    decoder, head = agent.vlm.get_decoder(), agent.vlm.get_output_embeddings()
    adapted = [m for m in agent.vlm.modules() if isinstance(m, LoraLayer)]
    assert len(adapted) == 15 and all(m is head or any(m is d for d in decoder.modules()) for m in adapted)
    assert all("lora_" in n for n, p in agent.policy.named_parameters() if p.requires_grad)
    # the critic head has the language head's shape (the vocabulary with the processor's added tokens) and
    # starts at its logits
    lm_head = agent.vlm.get_output_embeddings()
    assert (agent.critic.base.weight.shape == lm_head.weight.shape
            and lm_head.out_features >= len(agent.processor.tokenizer))
    h = torch.randn(3, lm_head.in_features)
    assert torch.allclose(agent.critic(h), lm_head(h), atol=1e-5)
    # responses end in the family's end-of-turn token; each state position predicts the next response token
    obs, _ = envs.make_env("numberline").reset(seed=0)
    inputs, state_mask, tokens, lengths = afsft.encode(agent.processor, [obs["image"]] * 2,
                                                       [obs["prompt"], "short"],
                                                       ["[action] +", "[action] - please"])
    tokenizer = agent.processor.tokenizer
    ends = torch.cumsum(lengths, 0) - 1
    assert tokenizer.convert_ids_to_tokens(tokens[ends].tolist()) == [FAMILY_END[family]] * 2
    for b in range(2):
        positions = state_mask[b].nonzero()[:, 0]
        assert (inputs["input_ids"][b, positions + 1].tolist()
                == tokens[ends[b] + 1 - lengths[b]:ends[b] + 1].tolist())
        assert (inputs["attention_mask"][b, :positions[-1] + 2].all()
                and not inputs["attention_mask"][b, positions[-1] + 2:].any())
    if family == "paligemma":  # the prefix attends both ways, the response causally
        assert (inputs["token_type_ids"][state_mask.roll(1, 1)] == 1).all()
    assert agent.features(inputs, state_mask).shape == (int(lengths.sum()), lm_head.in_features)


FAMILY_FLAGS = {"llava": ["--gradient-checkpointing"], "idefics3": ["--dtype", "bf16"], "qwen2_vl": [],
                "paligemma": []}


@pytest.mark.parametrize("family", list(FAMILY_END))
@pytest.mark.slow
def test_family_trains_through_the_cli(family, families, numberline_data, tmp_path):
    if family == "qwen2_vl" and not HAS_TORCHVISION:
        pytest.skip("transformers 5 builds Qwen2-VL's video processor on torchvision; "
                    "test_qwen2_vl_without_torchvision covers the rest")
    run = str(tmp_path / "run")
    result = run_cli("--env", "numberline", "--model", families[family], "--offline", numberline_data,
                     "--out", run, "--offline-steps", "3", "--online-rounds", "1", "--eval-episodes", "2",
                     *SMALL, *FAMILY_FLAGS[family])
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(run, "eval.json")) as f:
        assert json.load(f)["episodes"] == 2
    assert os.path.exists(os.path.join(run, "checkpoint", "policy", "adapter_config.json"))


@pytest.mark.skipif(HAS_TORCHVISION,
                    reason="with torchvision, test_family_trains_through_the_cli runs Qwen2-VL")
@pytest.mark.slow
def test_qwen2_vl_without_torchvision(families, numberline_data, tmp_path, monkeypatch):
    flags = ["--env", "numberline", "--model", families["qwen2_vl"], "--offline", numberline_data,
             "--offline-steps", "3", "--online-rounds", "1", "--eval-episodes", "2", *SMALL]
    result = run_cli(*flags, "--out", str(tmp_path / "cli"))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert ("Qwen2VLVideoProcessor requires the Torchvision library" in result.stderr
            and "pip install torchvision" in result.stderr)
    stub_qwen2_vl_video_processor(monkeypatch, families["qwen2_vl"])
    run = str(tmp_path / "stubbed")
    assert afsft.train(afsft.parse_args([*flags, "--out", run]))["episodes"] == 2
    assert os.path.exists(os.path.join(run, "checkpoint", "policy", "adapter_config.json"))


@pytest.mark.slow
def test_bf16_trunk_fp32_heads_and_gradient_checkpointing(families):
    args = afsft.Args(finetune="lora", lora_rank=2, critic_rank=4, dtype="bf16", gradient_checkpointing=True)
    agent = afsft.load_agent(args, families["llava"]).train()
    assert agent.vlm.dtype == torch.bfloat16 and agent.critic.up.weight.dtype == torch.float32
    calls = []  # checkpointing runs each decoder layer's forward (so its MLP) again during backward
    agent.vlm.get_decoder().layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    batch = afsft.Buffer([make_episode(4, True, image_side=32)]).sample(np.random.default_rng(0), 4, 2)
    loss, _ = afsft.afsft_loss(agent, batch, args, warmup=False, device="cpu")
    assert loss.dtype == torch.float32 and len(calls) == 2  # the forward, and the bootstrap's no-grad forward
    loss.backward()
    assert len(calls) == 3 and all(p.grad is not None for p in agent.parameters() if p.requires_grad)


def test_exploration_replaces_rejected_replies_only(tiny, monkeypatch):
    agent, args = tiny
    args = afsft.replace(args, env="numberline", num_envs=4, max_new_tokens=4)
    exploring, plain = afsft.Rollout(args, seed=0), afsft.Rollout(args, seed=0)
    for _ in range(3):  # the base writes no valid action, so every valid turn is an exploring one
        torch.manual_seed(0)
        exploring.step(agent, args, 1.0, "cpu", explore=1.0)
        torch.manual_seed(0)
        plain.step(agent, args, 1.0, "cpu")
    turns = [turn for open_turns in exploring.turns for turn in open_turns]
    assert {turn[2] for turn in turns} == {"[action] +", "[action] -"} and all(turn[4] for turn in turns)
    assert not any(turn[4] for turns in plain.turns for turn in turns)
    # a reply the env accepts is the policy's own, exploring or not
    monkeypatch.setattr(afsft, "generate", lambda agent, images, *_: ["[action] +"] * len(images))
    valid_replies = afsft.Rollout(args, seed=0)
    finished = valid_replies.step(agent, args, 1.0, "cpu", explore=1.0)
    actions = [a for ep in finished for a in ep["actions"]] + [t[2] for ts in valid_replies.turns for t in ts]
    assert actions == ["[action] +"] * 4


def test_generation_reuses_the_kv_cache(tiny):
    agent, _ = tiny
    lengths = []  # tokens fed to the language model per forward: the prompt, then one new token at a time
    hook = agent.vlm.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True)
    obs, _ = envs.make_env("babyai").reset(seed=0)
    try:
        afsft.generate(agent, [obs["image"]] * 2, [obs["prompt"]] * 2, 0.0, 6, "cpu")
    finally:
        hook.remove()
    assert lengths[0] > 10 and len(lengths) > 1 and set(lengths[1:]) == {1}


@pytest.mark.slow
def test_torchrun_ranks_end_with_the_same_weights(numberline_data, tmp_path):
    run = str(tmp_path / "run")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", os.path.join(HERE, "afsft.py"), "--env", "numberline",
                             "--offline", numberline_data, "--out", run, "--offline-steps", "3",
                             "--online-rounds", "1", "--eval-episodes", "2", *SMALL],
                            capture_output=True, text=True, timeout=600, cwd=HERE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    # afsft.py ends a DDP run by comparing every rank's weights (a checksum per tensor) and fails if they
    # differ
    assert "different weights" not in result.stderr
    steps = [m["step"] for m in read_metrics(run)]  # written by rank 0 alone
    assert steps == [2, 4, 5, 5] and json.load(open(os.path.join(run, "eval.json")))["episodes"] == 2
    assert os.path.exists(os.path.join(run, "checkpoint", "state.pt"))
