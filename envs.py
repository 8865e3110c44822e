"""Text-action environments for AFSFT, and the datasets they need.

Every domain is a small subclass of `TextActionEnv`: a gymnasium env whose
observation is {"image": uint8[H,W,3], "prompt": str} and whose action is the
agent's whole text response. Turning text into an env action happens in two
steps, both owned here and never by the learner:

    parse_agent(response, scheme) -> action text or None   (the prompting scheme)
    env.parse_env(action text)    -> env action or None    (the domain)

A response that fails either step is an *invalid action*: it earns
`-invalid_penalty`, leaves the env state unchanged, uses up one turn, and is
reported as `info["valid"] = False`.

    python envs.py collect --env babyai --policy mixed --expert-fraction 0.3 --episodes 300 --out data.pt
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import io
import itertools
import json
import operator
import os
import re
import shutil
import sys
from fractions import Fraction

import gymnasium as gym
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

DATASET_FORMAT = "afsft-v2"  # each turn's image stored as PNG bytes; "afsft-v1" files (raw pixels) still load
DATASET_FORMATS = ("afsft-v1", "afsft-v2")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# ---------------------------------------------------------------------------
# Prompting schemes: how a response carries its action.
# ---------------------------------------------------------------------------
SCHEMES = {
    "tag": 'End your reply with "[action]" followed by exactly one action.',
    "json": 'Reply in JSON: {"thoughts": "...", "action": "<one action>"}.',
}


def format_response(action: str, scheme: str = "tag") -> str:
    """The response a scripted policy writes for `action` (no reasoning)."""
    return f"[action] {action}" if scheme == "tag" else json.dumps({"action": action})


def parse_agent(response: str, scheme: str = "tag") -> str | None:
    """Extract the action text from a free-form response, or None.

    The prompt asks for exactly one action at the end of the reply, and the parser holds it to that: a reply
    that names two actions is ambiguous, and one that goes on after its action did not end there.
    tag:  one "[action]" tag, at the start of the reply or after a space; the action is the rest of the reply.
    json: the string value of the one "action" key.
    Matching ignores the case of the action and surrounding spaces and a final '.'.
    """
    if scheme == "tag":
        head, sep, tail = response.partition("[action]")
        one_tag = sep and "[action]" not in tail and (not head or head[-1].isspace())
        found = tail if one_tag else None
    elif scheme == "json":
        matches = re.findall(r'"action"\s*:\s*"([^"]*)"', response)
        found = matches[0] if len(matches) == 1 else None
    else:
        raise ValueError(f"unknown prompting scheme {scheme!r}; choose from {sorted(SCHEMES)}")
    if found is None:
        return None
    found = found.strip().rstrip(".").strip().lower()
    return found or None


class TextActionEnv(gym.Env):
    """Shared base: (image, prompt) observations, free text actions.

    A subclass sets `action_words` and implements `_reset()`, `_act(action)`
    (returning reward, terminated, truncated), `image()`, `goal()`, and the
    scripted policies `expert_action()` and `suboptimal_action()` (indices
    into `action_words`). `_act` receives whatever `parse_env` returned: an
    index, unless a subclass parses to something richer (MiniWoB's clicks).

    `success(return)` is RL4VLM's definition (return > 0). The unambiguous one,
    "the episode ended on a winning reward", is `info["solved"]`: True only on
    a step that terminates with a positive reward.

    On `check_env`: the action space is `Text`, so its random samples are
    (almost always) invalid responses, which exercises the invalid-action path.
    """

    metadata = {"render_modes": ["rgb_array"]}
    action_words: list[str] = []
    image_shape: tuple[int, int, int] = (56, 56, 3)

    def __init__(self, scheme: str = "tag", invalid_penalty: float = 0.1, max_turns: int = 64,
                 history: int = 0):
        if scheme not in SCHEMES:
            raise ValueError(f"unknown prompting scheme {scheme!r}; choose from {sorted(SCHEMES)}")
        self.scheme, self.invalid_penalty = scheme, invalid_penalty
        self.max_turns, self.history = max_turns, history
        self.observation_space = gym.spaces.Dict({
            "image": gym.spaces.Box(0, 255, self.image_shape, np.uint8),
            "prompt": gym.spaces.Text(max_length=4096, charset=_PRINTABLE),
        })
        self.action_space = gym.spaces.Text(max_length=1024, charset=_PRINTABLE)
        self.render_mode = "rgb_array"

    # --- the text interface -------------------------------------------------
    def parse_env(self, action_text: str | None) -> int | None:
        """Map action text to an index into `action_words`, or None if invalid."""
        return self.action_words.index(action_text) if action_text in self.action_words else None

    def action_help(self) -> str:
        return "Actions: " + ", ".join(self.action_words) + "."

    def prompt(self) -> str:
        lines = [self.goal(), self.action_help()]
        if self.history:
            lines.append("Your last actions: " + (", ".join(self.recent[-self.history:]) or "none") + ".")
        return "\n".join(lines + [SCHEMES[self.scheme]])

    def observe(self) -> dict:
        return {"image": self.image(), "prompt": self.prompt()}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.turn, self.recent = 0, []
        self._reset(seed)
        return self.observe(), {}

    def step(self, response: str):
        text = parse_agent(response, self.scheme)
        action = self.parse_env(text)
        self.turn += 1
        if action is None:  # defined outcome: penalty, state unchanged, one turn used
            reward, terminated, truncated = -self.invalid_penalty, False, False
            self.recent.append("(invalid)")
        else:
            reward, terminated, truncated = self._act(action)
            self.recent.append(text)
        truncated = truncated or (self.turn >= self.max_turns and not terminated)
        info = {"valid": action is not None, "solved": bool(terminated and reward > 0)}
        return self.observe(), float(reward), terminated, truncated, info

    def render(self):
        return self.image()

    def random_action(self) -> int:
        return int(self.np_random.integers(len(self.action_words)))

    def success(self, episode_return: float) -> bool:
        """An episode succeeds if its return is positive (RL4VLM's definition)."""
        return episode_return > 0


_PRINTABLE = "".join(chr(c) for c in range(32, 127)) + "\n"

# ---------------------------------------------------------------------------
# BabyAI (minigrid)
# ---------------------------------------------------------------------------
BABYAI_WORDS = ["turn left", "turn right", "go forward", "pick up", "drop", "toggle", "done"]


class BabyAIText(TextActionEnv):
    """Any BabyAI level with the agent's 56x56 egocentric view and text actions.

    Unlike minigrid, where `done` is a no-op, saying "done" ends the episode (pass `done_ends_episode=False`
    for minigrid's rule). With `text_view=True` the prompt also describes what the agent sees, in BabyAI-
    Text's style ("a red ball 2 steps left and 1 step forward"), after the cell in front of it."""

    action_words = BABYAI_WORDS

    def __init__(self, level: str = "BabyAI-GoToRedBall-v0", tile_size: int = 8, text_view: bool = False,
                 done_ends_episode: bool = True, **kwargs):
        import minigrid  # noqa: F401  (registers the BabyAI ids)

        self.level, self.tile_size, self.text_view = level, tile_size, text_view
        self.done_ends_episode = done_ends_episode
        self.inner = gym.make(level).unwrapped
        view = self.inner.agent_view_size * tile_size
        self.image_shape = (view, view, 3)
        with contextlib.redirect_stdout(io.StringIO()):
            self.inner.reset(seed=0)
        kwargs.setdefault("max_turns", self.inner.max_steps)
        super().__init__(**kwargs)

    def _reset(self, seed):
        with contextlib.redirect_stdout(io.StringIO()):  # minigrid prints its rejection sampling
            self.inner.reset(seed=int(self.np_random.integers(2**31)))
        self.bot = self.decoy_bot = None

    def _act(self, index):
        _, reward, terminated, truncated, _ = self.inner.step(index)
        # "done" declares the mission finished: the episode ends with the verifier's verdict (0 unless
        # it already succeeded). minigrid leaves it a no-op; a text agent that says it is done is done.
        terminated = terminated or (self.done_ends_episode and self.action_words[index] == "done")
        return reward, terminated, truncated

    def image(self):
        return self.inner.get_pov_render(tile_size=self.tile_size)

    def goal(self):
        lines = [f"Mission: {self.inner.mission}."]
        if self.text_view:
            lines.append(self.describe_view())
        if self.inner.carrying:
            lines.append(f"You carry a {self.inner.carrying.color} {self.inner.carrying.type}.")
        return "\n".join(lines)

    def describe_view(self) -> str:
        grid, visible = self.inner.gen_obs_grid()
        me_x, me_y = grid.width // 2, grid.height - 1
        seen = []
        for x in range(grid.width):
            for y in range(grid.height):
                cell = grid.get(x, y)
                if cell is None or not visible[x, y] or (x, y) == (me_x, me_y) or cell.type == "wall":
                    continue
                side, ahead = x - me_x, me_y - y
                where = [f"{abs(side)} steps {'left' if side < 0 else 'right'}"] if side else []
                where += [f"{ahead} steps forward"] if ahead else []
                seen.append(f"a {cell.color} {cell.type} {' and '.join(where)}")
        # the nearest walls, as BabyAI-Text says them
        for name, (dx, dy) in (("forward", (0, -1)), ("left", (-1, 0)), ("right", (1, 0))):
            x, y, steps = me_x + dx, me_y + dy, 1
            while 0 <= x < grid.width and 0 <= y < grid.height and visible[x, y] and grid.get(x, y) is None:
                x, y, steps = x + dx, y + dy, steps + 1
            inside = 0 <= x < grid.width and 0 <= y < grid.height and visible[x, y]
            if inside and grid.get(x, y).type == "wall":
                seen.append(f"a wall {steps} steps {name}")
        # First the one cell a step reaches, which decides `go forward` (blocked or not) and `done`.
        # BabyAI-Text leaves it to be read off "1 steps forward" in the list, which a tiny model trained
        # from scratch did not learn (experiments/findings.md).
        cell = grid.get(me_x, me_y - 1)
        front = "nothing" if cell is None else "a wall" if cell.type == "wall" else \
            f"a {cell.color} {cell.type}"
        return f"In front of you: {front}. You see " + ("; ".join(seen) if seen else "nothing") + "."

    # --- scripted policies ----------------------------------------------------
    def expert_action(self) -> int:
        from minigrid.utils.baby_ai_bot import BabyAIBot

        self.bot = self.bot or BabyAIBot(self.inner)
        return int(self.bot.replan())

    def suboptimal_action(self) -> int:
        """BabyAIBot sent to the nearest object that is not the mission's target.

        The mistake is consistent (always the nearest distractor), so SFT can
        copy it; heading for a random distractor would average out instead.
        """
        if self.decoy_bot is None:
            self.decoy_bot = self._bot_for_nearest_distractor()
        return int(self.decoy_bot.replan())

    def _bot_for_nearest_distractor(self):
        from minigrid.envs.babyai.core.verifier import GoToInstr, ObjDesc
        from minigrid.utils.baby_ai_bot import BabyAIBot

        env, real = self.inner, self.inner.instrs
        targets = {id(o) for o in getattr(getattr(real, "desc", None), "obj_set", [])}
        others = [o for o in env.grid.grid
                  if o is not None and o.type in ("ball", "box", "key") and id(o) not in targets]
        if not others:  # nothing to confuse: the bot acts as the expert
            return BabyAIBot(env)
        x, y = env.agent_pos
        nearest = min(others, key=lambda o: abs(o.cur_pos[0] - x) + abs(o.cur_pos[1] - y))
        decoy = GoToInstr(ObjDesc(nearest.type, nearest.color))
        decoy.reset_verifier(env)
        decoy.desc.obj_set, decoy.desc.obj_poss = [nearest], [nearest.cur_pos]
        env.instrs = decoy
        try:
            return BabyAIBot(env)
        finally:
            env.instrs = real


# ---------------------------------------------------------------------------
# gym_cards (RL4VLM): NumberLine, EZPoints, Points24, Blackjack
# ---------------------------------------------------------------------------
FONT_PATH = "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf"  # Debian's fonts-dejavu-core
RANKS = {1: "A", 11: "J", 12: "Q", 13: "K"}  # other ranks print as their number
SUITS = "\u2660\u2665\u2666\u2663"  # spades, hearts, diamonds, clubs


@functools.lru_cache(maxsize=None)
def font(size: int):
    """Upstream's DejaVu Sans Bold, or Pillow's built-in font where it is not installed."""
    if os.path.exists(FONT_PATH):
        return ImageFont.truetype(FONT_PATH, size)
    return ImageFont.load_default(size=size)


def draw_card(draw, box, card: tuple[int, int] | None):
    """Draw a (rank, suit) card into box = (left, top, right, bottom); None draws a face-down card."""
    x0, y0, x1, y1 = box
    if card is None:
        draw.rounded_rectangle(box, radius=8, fill="#1f4e9c", outline="white", width=4)
        draw.rectangle((x0 + 12, y0 + 12, x1 - 12, y1 - 12), outline="#8fb4ec", width=2)
        return
    rank, suit = card
    color = "#c0392b" if suit in (1, 2) else "black"
    draw.rounded_rectangle(box, radius=8, fill="white", outline="black", width=2)
    draw.text((x0 + 6, y0 + 4), rank_name(rank), fill=color, font=font((y1 - y0) // 4))  # legible at 112x112
    draw.text(((x0 + x1) / 2, (y0 + y1) / 2), SUITS[suit], fill=color, font=font((y1 - y0) // 3), anchor="mm")


NUMBERS = [str(n) for n in range(1, 11)]


def card_value(card: tuple[int, int]) -> int:
    return min(card[0], 10)  # J, Q and K count as 10, an ace as 1


def rank_name(rank: int) -> str:
    return RANKS.get(rank, str(rank))


class GymCardsEnv(TextActionEnv):
    """Shared by the gym_cards games: a 300x300 picture (`draw`), a rules text, and an
    option to also state the picture in words (`text_view`, off as upstream; `describe`)."""

    image_shape = (300, 300, 3)
    rules = ""

    def __init__(self, text_view: bool = False, **kwargs):
        self.text_view = text_view
        super().__init__(**kwargs)

    def goal(self) -> str:
        return self.rules + ("\n" + self.describe() if self.text_view else "")

    def deal(self) -> tuple[int, int]:
        return int(self.np_random.integers(1, 14)), int(self.np_random.integers(4))

    def image(self):
        height, width, _ = self.image_shape
        picture = Image.new("RGB", (width, height), self.background)
        self.draw(ImageDraw.Draw(picture))
        return np.asarray(picture)


class NumberLine(GymCardsEnv):
    """Move the current number (0..5) onto the target with '+' and '-'.

    Reward +1 for reaching the target (the episode ends), 0 for a move that
    gets closer, -1 for one that does not. Truncated after 10 turns.
    """

    action_words = ["+", "-"]
    background = "white"
    max_position = 5
    rules = ("You are playing NumberLine. The image shows a target number and your current number. "
             "Move the current number to the target: '+' adds 1, '-' subtracts 1.")

    def __init__(self, **kwargs):
        kwargs.setdefault("max_turns", 10)
        super().__init__(**kwargs)

    def _reset(self, seed):
        self.position, self.target = self.np_random.integers(0, self.max_position + 1, size=2).tolist()
        if self.position == self.target:  # upstream's rule, modulo included
            self.target = (self.target + 1) % self.max_position

    def _act(self, index):
        before = abs(self.position - self.target)
        step = 1 if self.action_words[index] == "+" else -1
        self.position = min(max(self.position + step, 0), self.max_position)
        if self.position == self.target:
            return 1.0, True, False
        return (0.0 if abs(self.position - self.target) < before else -1.0), False, False

    def describe(self):
        return f"Target: {self.target}. Current: {self.position}."

    def draw(self, draw):
        # Each number fills about 3x4 of the model's 7x7 patches: drawn at upstream's size (36 px) a digit is
        # one or two patches in 49, and the tiny base's attention never finds it (README, "The tiny default
        # model").
        for x, label, number in ((75, "Target", self.target), (225, "Current", self.position)):
            draw.text((x, 40), label, fill="black", font=font(30), anchor="mm")
            draw.text((x, 170), str(number), fill="black", font=font(150), anchor="mm")

    def expert_action(self):
        return self.action_words.index("+" if self.target > self.position else "-")

    def suboptimal_action(self):
        """Always '+': right when the target is above, a wasted move when it is below."""
        return self.action_words.index("+")


class FormulaGame(GymCardsEnv):
    """Build, one token at a time, a formula that uses every held card once and equals `target`.

    A number played more often than it is held appends a blank token and costs
    -1. '=' ends the episode: +10 if the formula is right, else -1. A formula
    longer than `max_length` tokens costs -1 and truncates the episode.
    """

    background = "#35654d"
    naive_operator = "+"  # the suboptimal policy joins all cards with this operator
    target = max_length = n_cards = 0
    card_boxes: list[tuple[int, int, int, int]] = []

    def _reset(self, seed):
        self.cards, self.formula, self._solutions = self.deal_hand(), [], None

    def deal_hand(self):
        return [self.deal() for _ in range(self.n_cards)]

    def numbers(self) -> list[int]:
        return sorted(card_value(card) for card in self.cards)

    def _act(self, index):
        token = self.action_words[index]
        if token == "=":
            value = evaluate(self.formula)
            used = sorted(int(t) for t in self.formula if t.isdigit())
            return (10.0 if value == self.target and used == self.numbers() else -1.0), True, False
        reward = 0.0
        if token.isdigit() and self.formula.count(token) >= self.numbers().count(int(token)):
            token, reward = " ", -1.0  # a number not (or no longer) held
        self.formula.append(token)
        if len(self.formula) > self.max_length:
            return -1.0, False, True
        return reward, False, False

    def goal(self):
        return super().goal() + f"\nFormula: {' '.join(self.formula)}"

    def describe(self):
        return "Your cards: " + ", ".join(rank_name(rank) for rank, _ in self.cards) + "."

    def draw(self, draw):
        for card, box in zip(self.cards, self.card_boxes):
            draw_card(draw, box, card)
        draw.text((10, 258), f"Formula: {' '.join(self.formula)}", fill="white", font=font(20))

    def solutions(self) -> list[list[str]]:
        if self._solutions is None:
            playable = set(self.action_words)
            self._solutions = [
                tokens for tokens, value in expressions(self.numbers(), playable & set(ARITHMETIC))
                if value == self.target and len(tokens) <= self.max_length and set(tokens) <= playable]
        return self._solutions

    def _continue(self, plans) -> int:
        """The next token of the first plan the formula so far starts; '=' when none does."""
        n = len(self.formula)
        plan = next((p for p in plans if p[:n] == self.formula and len(p) > n), None)
        return self.action_words.index(plan[n] if plan else "=")

    def expert_action(self):
        """Play a formula that equals the target, or '=' at once if the hand has none."""
        return self._continue(self.solutions())

    def suboptimal_action(self):
        """Join the cards, in the order dealt, with one fixed operator, then '='."""
        plan = [str(card_value(self.cards[0]))]
        for card in self.cards[1:]:
            plan += [self.naive_operator, str(card_value(card))]
        return self._continue([plan])


class EZPoints(FormulaGame):
    """Two cards whose sum or product is 12; tokens 1..10, '+', '*', '='."""

    action_words, naive_operator = NUMBERS + ["+", "*", "="], "*"
    target, max_length, n_cards = 12, 5, 2
    card_boxes = [(10, 50, 145, 239), (155, 50, 290, 239)]  # two 135x189 cards
    rules = ("You are playing EZPoints. The image shows two playing cards; J, Q and K count as 10. "
             "Build a formula that uses each card once and equals 12, one token per action, then play '='.")

    def deal_hand(self):
        first = (int(self.np_random.integers(2, 14)), int(self.np_random.integers(4)))
        v = card_value(first)
        times = v in (1, 2, 3, 4, 6) and self.np_random.random() < 0.5
        second = (12 // v if times else 12 - v, int(self.np_random.integers(4)))
        return [second, first] if self.np_random.random() < 0.5 else [first, second]


class Points24(FormulaGame):
    """Four cards; make 24 with + - * / and parentheses."""

    action_words = NUMBERS + ["+", "-", "*", "/", "(", ")", "="]
    target, max_length, n_cards = 24, 20, 4
    card_boxes = [(45, 8, 140, 128), (160, 8, 255, 128), (45, 134, 140, 254), (160, 134, 255, 254)]
    rules = ("You are playing Points24. The image shows four playing cards; A counts as 1 and J, Q, K as 10. "
             "Build a formula that uses each card once and equals 24, one token per action, then play '='.")


ARITHMETIC = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
AST_SYMBOLS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


def evaluate(tokens: list[str]) -> Fraction | None:
    """The exact value of an arithmetic formula (as Python would compute it), or None if it is not one.

    Tokens are joined with spaces, so two numbers played in a row ("1", "2") are
    a syntax error rather than the number 12.
    """
    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in AST_SYMBOLS:
            return ARITHMETIC[AST_SYMBOLS[type(node.op)]](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            return value(node.operand) * (-1 if isinstance(node.op, ast.USub) else 1)
        raise ValueError("not an arithmetic formula")

    try:
        return value(ast.parse(" ".join(tokens), mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError):
        return None


def expressions(numbers: list[int], ops) -> list[tuple[list[str], Fraction]]:
    """Every formula that uses each of `numbers` once, as (tokens, exact value), parenthesised only where
    needed."""
    @functools.lru_cache(maxsize=None)
    def build(indices):  # -> [(tokens, value, precedence of the outermost operator)]
        if len(indices) == 1:
            return [([str(numbers[indices[0]])], Fraction(numbers[indices[0]]), 3)]
        found = []
        for mask in range(1, 2 ** len(indices) - 1):  # every split into a left and a right part
            left = tuple(i for k, i in enumerate(indices) if mask >> k & 1)
            right = tuple(i for i in indices if i not in left)
            for (lt, lv, lp), (rt, rv, rp), op in itertools.product(build(left), build(right), sorted(ops)):
                if op == "/" and rv == 0:
                    continue
                p = PRECEDENCE[op]
                lt = ["(", *lt, ")"] if lp < p else lt
                rt = ["(", *rt, ")"] if rp < p or (rp == p and op in "-/") else rt  # a-(b-c), a/(b/c)
                found.append((lt + [op] + rt, ARITHMETIC[op](lv, rv), p))
        return found

    return [(tokens, value) for tokens, value, _ in build(tuple(range(len(numbers))))]


class Blackjack(GymCardsEnv):
    """gymnasium's Blackjack: an infinite deck, the dealer draws to 17, no natural bonus.

    'hit' takes a card (-1 and the end on a bust); 'stand' lets the dealer play
    and ends with +1 (win), 0 (draw) or -1 (loss). Only the dealer's first card shows.
    """

    action_words = ["stand", "hit"]
    background = "#35654d"
    rules = ("You are playing Blackjack. The image shows the dealer's cards on top (one face down) and yours "
             "below. Get closer to 21 than the dealer without going over: 'hit' takes a card, 'stand' ends "
             "your turn.")

    def _reset(self, seed):
        self.dealer, self.player = [self.deal(), self.deal()], [self.deal(), self.deal()]

    def _act(self, index):
        if self.action_words[index] == "hit":
            self.player.append(self.deal())
            return (-1.0, True, False) if hand_total(self.player)[0] > 21 else (0.0, False, False)
        while hand_total(self.dealer)[0] < 17:
            self.dealer.append(self.deal())
        dealer = hand_total(self.dealer)[0]
        return float(np.sign(hand_total(self.player)[0] - (0 if dealer > 21 else dealer))), True, False

    def describe(self):
        total, soft = hand_total(self.player)
        return (f"Dealer shows {rank_name(self.dealer[0][0])}. "
                f"Your total is {'soft ' if soft else ''}{total}.")

    def draw(self, draw):
        for y, cards in ((20, [self.dealer[0], None]), (165, self.player)):
            step = min(90, (300 - 40 - 80) / max(len(cards) - 1, 1))  # overlap cards when there are many
            for i, card in enumerate(cards):
                draw_card(draw, (20 + i * step, y, 100 + i * step, y + 112), card)

    def expert_action(self):
        """Basic strategy for hit/stand (no doubling or splitting) against the dealer's up card."""
        total, soft = hand_total(self.player)
        up = card_value(self.dealer[0])
        if soft:
            stand = total >= 19 or (total == 18 and 2 <= up <= 8)
        else:
            stand = total >= 17 or (13 <= total <= 16 and 2 <= up <= 6) or (total == 12 and 4 <= up <= 6)
        return self.action_words.index("stand" if stand else "hit")

    def suboptimal_action(self):
        """Hit until 20 or more, whatever the dealer shows."""
        return self.action_words.index("hit" if hand_total(self.player)[0] < 20 else "stand")


def hand_total(cards) -> tuple[int, bool]:
    """The best total of a blackjack hand, and whether an ace in it counts as 11 (a soft hand)."""
    total = sum(card_value(card) for card in cards)
    soft = any(card[0] == 1 for card in cards) and total + 10 <= 21
    return total + 10 * soft, soft


# ---------------------------------------------------------------------------
# MiniWoB++ (the `miniwob` package, in a headless Chromium)
# ---------------------------------------------------------------------------
BROWSER_HELP = ("MiniWoB++ needs Chromium and its driver: apt-get install chromium chromium-driver "
                "(or point MINIWOB_CHROME_BINARY and MINIWOB_CHROMEDRIVER at a Chrome and its chromedriver)")


class BrowserDied(RuntimeError):
    """MiniWoB's browser died and could not be restarted."""


class MissingDependency(RuntimeError):
    """A domain's software is not installed; the message says what to install."""


def ascii_line(text: str) -> str:
    """Page text as one line of printable ASCII, as the prompt's Text space allows."""
    return " ".join(text.split()).encode("ascii", "replace").decode()


class MiniWoBText(TextActionEnv):
    """A MiniWoB++ task: the 160x210 screenshot, the instruction, and the page's elements as text.

    Actions are `click(ref=N)` on a listed element or `click(x=X, y=Y)` in
    screenshot pixels. The reward is binary: +1 or -1 on the step that ends the
    task. The page's 10 s timer is raised to 1000 s before each reset (a slow
    model must not fail on time alone) and the env caps an episode at
    `max_turns` (5) instead; running out of turns scores 0.
    """

    image_shape = (210, 160, 3)
    max_elements = 20  # elements listed in the prompt, in page order, of at most 160 characters each

    def __init__(self, task: str = "click-test-2", **kwargs):
        kwargs.setdefault("max_turns", 5)
        super().__init__(**kwargs)
        self.task, self.inner = task, launch_miniwob(task)

    def _reset(self, seed):
        task_seed = int(self.np_random.integers(2**31))
        for attempt in range(2):  # a browser that died is restarted once; twice in a row stops the run
            try:
                self.inner.instance.driver.execute_script("core.EPISODE_MAX_TIME = 1000000;")
                self.obs, _ = self.inner.reset(seed=task_seed)
                return
            except Exception as err:  # selenium and urllib3 raise many kinds when the browser is gone
                self.restart_browser(err)
        raise BrowserDied(f"miniwob/{self.task}: the browser died again right after a restart")

    def _act(self, action):
        try:
            self.obs, reward, terminated, _, _ = self.inner.step(action)
        except Exception as err:
            # The episode cannot go on: it ends as a truncation with no reward, on its last
            # observation, and the next reset() runs in a new browser.
            self.restart_browser(err)
            return 0.0, False, True
        return reward, terminated, False

    def restart_browser(self, err):
        print(f"miniwob/{self.task}: the browser died ({type(err).__name__}); restarting it", file=sys.stderr)
        try:
            self.inner.close()
        except Exception:
            pass
        self.inner = launch_miniwob(self.task)

    def close(self):
        self.inner.close()

    # --- the text interface -------------------------------------------------
    def elements(self) -> list[dict]:
        """The clickable elements: every real element (ref > 0; text nodes have ref < 0) but <body>."""
        elements = [e for e in self.obs["dom_elements"] if e["ref"] > 0 and e["tag"] != "body"]
        return elements[: self.max_elements]

    @property
    def action_words(self):
        return [f"click(ref={e['ref']})" for e in self.elements()]

    def parse_env(self, action_text):
        """`click(ref=N)` for a listed N, or `click(x=X, y=Y)` inside the screenshot (spaces allowed)."""
        from miniwob.action import ActionTypes

        text, number = action_text or "", r"\s*(\d+(?:\.\d+)?)\s*"
        if by_ref := re.fullmatch(r"click\(\s*ref\s*=\s*(\d+)\s*\)", text):
            ref = int(by_ref[1])
            listed = any(e["ref"] == ref for e in self.elements())
            return self.inner.create_action(ActionTypes.CLICK_ELEMENT, ref=ref) if listed else None
        if by_point := re.fullmatch(rf"click\(\s*x\s*={number},\s*y\s*={number}\)", text):
            x, y = float(by_point[1]), float(by_point[2])
            if x <= self.image_shape[1] and y <= self.image_shape[0]:
                point = np.array([x, y], dtype=np.float32)
                return self.inner.create_action(ActionTypes.CLICK_COORDS, coords=point)
        return None

    def goal(self):
        lines = [f"Task: {ascii_line(self.obs['utterance'])}", "Page elements:"]
        for e in self.elements():
            left, top, width, height = (int(e[k].item()) for k in ("left", "top", "width", "height"))
            described = " ".join(part for part in (
                e["tag"], f'"{e["text"]}"' if e["text"] else "", f"id={e['id']}" if e["id"] else "",
                f"class={e['classes']}" if e["classes"] else "") if part)
            where = f"x={left}..{left + width}, y={top}..{top + height}"
            lines.append(ascii_line(f"[{e['ref']}] {described} at {where}")[:160])
        return "\n".join(lines)

    def action_help(self):
        return ("Actions: click(ref=N) clicks the element listed as [N]; "
                "click(x=X, y=Y) clicks the screenshot's pixel (X, Y).")

    def image(self):
        return self.obs["screenshot"].copy()  # a fresh array per observation, as gymnasium requires

    # --- scripted policies ----------------------------------------------------
    def target_index(self) -> int:
        """The element the instruction asks for: the one whose text is the task's "target" field
        (click-test-2, click-button, click-link), else a dialog's close button, else the first button."""
        target = dict(self.obs["fields"]).get("target", "").lower()
        rules = (lambda e: target and e["text"].strip().lower() == target,
                 lambda e: "titlebar-close" in e["classes"],
                 lambda e: e["tag"] == "button")
        elements = self.elements()
        return next((i for rule in rules for i, e in enumerate(elements) if rule(e)), 0)

    def expert_action(self):
        return self.target_index()

    def suboptimal_action(self):
        """A consistent wrong click: the first other element with the target's tag, else the first other."""
        elements, right = self.elements(), self.target_index()
        others = [i for i in range(len(elements)) if i != right]
        same_tag = [i for i in others if elements[i]["tag"] == elements[right]["tag"]]
        return (same_tag or others or [right])[0]


def launch_miniwob(task: str):
    """Start `miniwob/<task>-v1` on the local Chromium, never letting Selenium download a browser."""
    try:
        import miniwob
        from miniwob.reward import get_binary_reward
    except ImportError:
        raise MissingDependency("MiniWoB++ needs its Python package: pip install miniwob==1.1.0")
    binary = os.environ.get("MINIWOB_CHROME_BINARY") or shutil.which("chromium") or \
        shutil.which("google-chrome")
    driver = os.environ.get("MINIWOB_CHROMEDRIVER") or shutil.which("chromedriver")
    if not (binary and driver):
        raise MissingDependency(BROWSER_HELP)
    os.environ["MINIWOB_CHROME_BINARY"], os.environ["MINIWOB_CHROMEDRIVER"] = binary, driver
    gym.register_envs(miniwob)
    if f"miniwob/{task}-v1" not in gym.registry:
        raise ValueError(f"unknown MiniWoB++ task {task!r}")
    return gym.make(f"miniwob/{task}-v1", reward_processor=get_binary_reward).unwrapped


# ---------------------------------------------------------------------------
# One way to build any env from an --env name.
# ---------------------------------------------------------------------------
SHORT_NAMES = {"babyai": "BabyAI-GoToRedBall-v0", "numberline": "gym_cards/NumberLine-v0",
               "ezpoints": "gym_cards/EZPoints-v0", "points24": "gym_cards/Points24-v0",
               "blackjack": "gym_cards/Blackjack-v0", "miniwob": "miniwob/click-test-2-v1"}
GYM_CARDS = {"gym_cards/NumberLine-v0": NumberLine, "gym_cards/EZPoints-v0": EZPoints,
             "gym_cards/Points24-v0": Points24, "gym_cards/Blackjack-v0": Blackjack}


def same_env(a: str, b: str) -> bool:
    """Whether two names, short or full, name the same env (`babyai` and `BabyAI-GoToRedBall-v0` do)."""
    return SHORT_NAMES.get(a, a) == SHORT_NAMES.get(b, b)


def env_id(name: str) -> str:
    """The full id of a short name or full id, or a ValueError that lists the names."""
    full = SHORT_NAMES.get(name, name)
    if full.startswith("BabyAI-"):
        import minigrid  # noqa: F401  (registers the BabyAI ids)

        if full in gym.registry:
            return full
        raise ValueError(f"unknown BabyAI level {full!r}")
    if full in GYM_CARDS or re.fullmatch(r"miniwob/[\w.-]+-v1", full):
        return full
    raise ValueError(f"unknown env {name!r}; use one of {sorted(SHORT_NAMES)} or a full id such as "
                     "BabyAI-GoToLocal-v0 or miniwob/click-button-v1")


def make_env(name: str, seed: int | None = None, **kwargs) -> TextActionEnv:
    """Create a wrapped env from a short name or a full id; reset it if `seed` is given."""
    full = env_id(name)
    if full.startswith("BabyAI-"):
        env = BabyAIText(full, **kwargs)
    elif full in GYM_CARDS:
        env = GYM_CARDS[full](**kwargs)
    else:
        env = MiniWoBText(full[len("miniwob/"):-len("-v1")], **kwargs)
    if seed is not None:
        env.reset(seed=seed)
    return env


# ---------------------------------------------------------------------------
# Dataset collection and validation (the afsft dataset format; the README's "Datasets")
# ---------------------------------------------------------------------------
INVALID_TEXTS = ["I am not sure what to do.", "[action] jump", "[action]", "move ahead please",
                 "[action] turn"]


# Episode seeds: evaluation plays EVAL_SEED, EVAL_SEED + 1, ... (afsft.py's `evaluate`), and everything that
# trains (a dataset, the online rollouts) skips that block, so the evaluation is held out whatever --seed is.
EVAL_SEED = EVAL_BLOCK = 10**6


def training_seed(n: int) -> int:
    """The n-th episode seed that training may use: n, or n moved past the evaluation block once n reaches
    it (a dataset of `--seed 10` starts at 10 * 100_003, inside it). One-to-one, and the identity below
    EVAL_SEED, so datasets of seeds 0-9 are as they were."""
    return n + EVAL_BLOCK if n >= EVAL_SEED else n


def collect_episode(env: TextActionEnv, policy: str, rng: np.random.Generator, seed: int,
                    invalid_rate: float = 0.2, expert_fraction: float = 0.3) -> dict:
    """Run one episode of a scripted policy; its images are one uint8 [T,H,W,3] tensor (see `compress`)."""
    if policy == "mixed":
        policy = "expert" if rng.random() < expert_fraction else "suboptimal"
    obs, _ = env.reset(seed=seed)
    images, prompts, actions, rewards, valid = [], [], [], [], []
    terminated = truncated = False
    while not (terminated or truncated):
        if policy == "suboptimal" and rng.random() < invalid_rate:
            response = INVALID_TEXTS[rng.integers(len(INVALID_TEXTS))]
        else:
            index = {"random": env.random_action, "expert": env.expert_action,
                     "suboptimal": env.suboptimal_action}[policy]()
            response = format_response(env.action_words[index], env.scheme)
        images.append(obs["image"])
        prompts.append(obs["prompt"])
        actions.append(response)
        obs, reward, terminated, truncated, info = env.step(response)
        rewards.append(reward)
        valid.append(info["valid"])
    return {"images": torch.from_numpy(np.stack(images)), "prompts": prompts, "actions": actions,
            "rewards": torch.tensor(rewards, dtype=torch.float32), "valid": torch.tensor(valid),
            "terminated": bool(terminated), "truncated": bool(truncated)}


class DatasetError(ValueError):
    """A dataset file that cannot be trained on; the message names the problem."""


def png(image: np.ndarray) -> torch.Tensor:
    """An image as the bytes of a PNG file in a uint8 tensor: lossless, and torch.load(weights_only=True)
    reads it."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image)).save(buffer, format="PNG")
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def turn_image(episode: dict, t: int) -> np.ndarray:
    """Turn t's image, uint8 [H,W,3], from an episode of either layout: PNG bytes per turn, or raw pixels."""
    image = episode["images"][t]
    if image.ndim == 1:
        return np.asarray(Image.open(io.BytesIO(image.numpy().tobytes())).convert("RGB"))
    return image.numpy()


def compress(episode: dict) -> dict:
    """The episode with its images as PNG bytes, as a dataset file stores them."""
    if isinstance(episode["images"], list):
        return episode
    return {**episode, "images": [png(image) for image in episode["images"].numpy()]}


def save_dataset(path: str, env_name: str, episodes: list, options: dict | None = None) -> None:
    torch.save({"format": DATASET_FORMAT, "env": env_name, "episodes": [compress(ep) for ep in episodes],
                **({"options": options} if options else {})}, path)


def load_dataset(path: str, env_name: str | None = None) -> dict:
    """Load and validate a dataset file (afsft-v2, or v1). Never unpickles code (weights_only=True)."""
    try:
        data = torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file")
    except Exception as err:  # a hostile pickle, a truncated or foreign file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DatasetError(f"{path}: not a loadable afsft dataset ({first[:200]})")
    validate_dataset(data, path, env_name)
    return data


def validate_dataset(data, path: str = "dataset", env_name: str | None = None) -> None:
    if not isinstance(data, dict) or data.get("format") not in DATASET_FORMATS:
        raise DatasetError(f"{path}: format tag is not one of {', '.join(DATASET_FORMATS)}")
    if not isinstance(data.get("env"), str):
        raise DatasetError(f"{path}: field 'env' must be a string")
    if env_name is not None and not same_env(data["env"], env_name):
        raise DatasetError(f"{path}: collected on env {data['env']!r}, but --env is {env_name!r}")
    if not isinstance(data.get("options", {}), dict):
        raise DatasetError(f"{path}: field 'options' must be a dict")
    episodes = data.get("episodes")
    if not isinstance(episodes, list) or not episodes:
        raise DatasetError(f"{path}: field 'episodes' must be a non-empty list")
    for i, ep in enumerate(episodes):
        where = f"{path}: episode {i}"
        if not isinstance(ep, dict):
            raise DatasetError(f"{where}: must be a dict")
        images = ep.get("images")
        if data["format"] == "afsft-v1":
            if not (isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.ndim == 4
                    and images.shape[-1] == 3 and len(images) > 0):
                raise DatasetError(f"{where}: field 'images' must be a non-empty uint8 tensor [T,H,W,3]")
        elif not (isinstance(images, list) and images and all(
                isinstance(b, torch.Tensor) and b.dtype == torch.uint8 and b.ndim == 1
                and bytes(b[:8].tolist()) == PNG_SIGNATURE for b in images)):
            raise DatasetError(f"{where}: field 'images' must be a non-empty list of PNG files "
                               "(uint8 tensors)")
        T = len(images)
        for key in ("prompts", "actions"):
            value = ep.get(key)
            if not (isinstance(value, list) and len(value) == T and all(isinstance(s, str) for s in value)):
                raise DatasetError(f"{where}: field '{key}' must be a list of {T} strings")
        for key, dtype in (("rewards", torch.float32), ("valid", torch.bool)):
            value = ep.get(key)
            if not (isinstance(value, torch.Tensor) and value.dtype == dtype and value.shape == (T,)):
                raise DatasetError(f"{where}: field '{key}' must be a {dtype} tensor of shape [{T}]")
        if not torch.isfinite(ep["rewards"]).all():
            raise DatasetError(f"{where}: field 'rewards' holds NaN or inf")
        for key in ("terminated", "truncated"):
            if not isinstance(ep.get(key), bool):
                raise DatasetError(f"{where}: field '{key}' must be a bool")


def collect(args) -> list:
    env = make_env(args.env, scheme=args.scheme, **({"text_view": True} if args.text_view else {}))
    rng = np.random.default_rng(args.seed)
    try:
        episodes = [collect_episode(env, args.policy, rng, seed=training_seed(args.seed * 100_003 + i),
                                    invalid_rate=args.invalid_rate, expert_fraction=args.expert_fraction)
                    for i in range(args.episodes)]
    finally:
        env.close()
    returns = [float(ep["rewards"].sum()) for ep in episodes]
    # info["solved"] at the end
    solved = [ep["terminated"] and float(ep["rewards"][-1]) > 0 for ep in episodes]
    success = np.mean([env.success(r) for r in returns])
    valid = torch.cat([e["valid"] for e in episodes]).float().mean()
    print(f"{args.episodes} episodes of {args.policy} on {args.env}: success {success:.2f} (return > 0), "
          f"solved {np.mean(solved):.2f} (ended on a winning reward), mean return {np.mean(returns):.3f}, "
          f"valid actions {valid:.2f}")
    return episodes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect", help="run a scripted policy and save a dataset")
    c.add_argument("--env", default="babyai", help="short name or full id (default: babyai)")
    c.add_argument("--policy", default="mixed", choices=["random", "expert", "suboptimal", "mixed"])
    c.add_argument("--expert-fraction", type=float, default=0.3,
                   help="mixed: chance an episode is expert (default: 0.3)")
    c.add_argument("--invalid-rate", type=float, default=0.2,
                   help="suboptimal: chance of invalid text per turn (default: 0.2)")
    c.add_argument("--episodes", type=int, default=300, help="number of episodes (default: 300)")
    c.add_argument("--seed", type=int, default=0, help="seed of episodes and policies (default: 0)")
    c.add_argument("--scheme", default="tag", choices=sorted(SCHEMES), help="prompting scheme (default: tag)")
    c.add_argument("--text-view", action="store_true",
                   help="also describe the image in the prompt (BabyAI, cards)")
    c.add_argument("--out", default="data.pt", help="output file (default: data.pt)")
    args = parser.parse_args(argv)
    if args.episodes < 1 or not 0 <= args.expert_fraction <= 1 or not 0 <= args.invalid_rate <= 1:
        parser.error("--episodes must be >= 1 and --expert-fraction, --invalid-rate in [0, 1]")
    try:
        episodes = collect(args)
    except (ValueError, MissingDependency) as err:
        parser.exit(2, f"envs.py: error: {err}\n")
    # the prompt's form goes with the data: afsft.py checks that it trains and evaluates on the same form
    save_dataset(args.out, args.env, episodes, options={"scheme": args.scheme, "text_view": args.text_view})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
