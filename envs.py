"""Text-action environments for AFSFT, and the datasets they need.

Every domain is a small subclass of `TextActionEnv`: a gymnasium env whose
observation is {"image": uint8[H,W,3], "prompt": str} and whose action is the
agent's whole text response. Turning text into an env action happens in two
steps, both owned here and never by the learner (DESIGN.md section 1):

    parse_agent(response, scheme) -> action text or None   (the prompting scheme)
    env.parse_env(action text)    -> env action or None    (the domain)

A response that fails either step is an *invalid action*: it earns
`-invalid_penalty`, leaves the env state unchanged, uses up one turn, and is
reported as `info["valid"] = False`.

    python envs.py collect --env babyai --policy mixed --expert-fraction 0.3 --episodes 300 --out data.pt
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import sys

import gymnasium as gym
import numpy as np
import torch

DATASET_FORMAT = "afsft-v1"

# ---------------------------------------------------------------------------
# Prompting schemes: how a response carries its action (DESIGN.md section 1).
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

    tag:  the text after the last "[action]", up to the end of that line.
    json: the string value of the last "action" key.
    Matching is case-insensitive and ignores surrounding spaces and a final '.'.
    """
    if scheme == "tag":
        head, sep, tail = response.rpartition("[action]")
        found = tail.split("\n")[0] if sep else None
    elif scheme == "json":
        matches = re.findall(r'"action"\s*:\s*"([^"]*)"', response)
        found = matches[-1] if matches else None
    else:
        raise ValueError(f"unknown prompting scheme {scheme!r}; choose from {sorted(SCHEMES)}")
    if found is None:
        return None
    found = found.strip().rstrip(".").strip().lower()
    return found or None


class TextActionEnv(gym.Env):
    """Shared base: (image, prompt) observations, free text actions.

    A subclass sets `action_words` and implements `_reset()`, `_act(index)`
    (returning reward, terminated, truncated), `image()`, `goal()`, and the
    scripted policies `expert_action()` and `suboptimal_action()` (indices).
    """

    metadata = {"render_modes": ["rgb_array"]}
    action_words: list[str] = []
    image_shape: tuple[int, int, int] = (56, 56, 3)

    def __init__(self, scheme: str = "tag", invalid_penalty: float = 0.1, max_turns: int = 64, history: int = 0):
        if scheme not in SCHEMES:
            raise ValueError(f"unknown prompting scheme {scheme!r}; choose from {sorted(SCHEMES)}")
        self.scheme, self.invalid_penalty, self.max_turns, self.history = scheme, invalid_penalty, max_turns, history
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

    def prompt(self) -> str:
        lines = [self.goal(), "Actions: " + ", ".join(self.action_words) + "."]
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
        action = self.parse_env(parse_agent(response, self.scheme))
        self.turn += 1
        if action is None:  # defined outcome: penalty, state unchanged, one turn used
            reward, terminated, truncated = -self.invalid_penalty, False, False
            self.recent.append("(invalid)")
        else:
            reward, terminated, truncated = self._act(action)
            self.recent.append(self.action_words[action])
        truncated = truncated or (self.turn >= self.max_turns and not terminated)
        return self.observe(), float(reward), terminated, truncated, {"valid": action is not None}

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

    Unlike minigrid, where `done` is a no-op, saying "done" ends the episode (pass
    `done_ends_episode=False` for minigrid's rule). With `text_view=True` the prompt also describes what the agent sees, in
    BabyAI-Text's style ("a red ball 2 steps left and 1 step forward").
    """

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
        return "You see " + ("; ".join(seen) if seen else "nothing") + "."

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
        others = [o for o in env.grid.grid if o is not None and o.type in ("ball", "box", "key") and id(o) not in targets]
        if not others:  # nothing to confuse: the bot acts as the expert
            return BabyAIBot(env)
        nearest = min(others, key=lambda o: abs(o.cur_pos[0] - env.agent_pos[0]) + abs(o.cur_pos[1] - env.agent_pos[1]))
        decoy = GoToInstr(ObjDesc(nearest.type, nearest.color))
        decoy.reset_verifier(env)
        decoy.desc.obj_set, decoy.desc.obj_poss = [nearest], [nearest.cur_pos]
        env.instrs = decoy
        try:
            return BabyAIBot(env)
        finally:
            env.instrs = real


# ---------------------------------------------------------------------------
# One way to build any env from an --env name.
# ---------------------------------------------------------------------------
SHORT_NAMES = {"babyai": "BabyAI-GoToRedBall-v0"}


def make_env(name: str, seed: int | None = None, **kwargs) -> TextActionEnv:
    """Create a wrapped env from a short name or a full id; reset it if `seed` is given."""
    full = SHORT_NAMES.get(name, name)
    if full.startswith("BabyAI-"):
        import minigrid  # noqa: F401

        if full not in gym.registry:
            raise ValueError(f"unknown BabyAI level {full!r}")
        env = BabyAIText(full, **kwargs)
    else:
        raise ValueError(f"unknown env {name!r}; use one of {sorted(SHORT_NAMES)} or a full id such as BabyAI-GoToLocal-v0")
    if seed is not None:
        env.reset(seed=seed)
    return env


# ---------------------------------------------------------------------------
# Dataset collection and validation (the afsft-v1 format of DESIGN.md section 2)
# ---------------------------------------------------------------------------
INVALID_TEXTS = ["I am not sure what to do.", "[action] jump", "[action]", "move ahead please", "[action] turn"]


def collect_episode(env: TextActionEnv, policy: str, rng: np.random.Generator, seed: int,
                    invalid_rate: float = 0.2, expert_fraction: float = 0.3) -> dict:
    """Run one episode of a scripted policy and return it in the afsft-v1 layout."""
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


def load_dataset(path: str, env_name: str | None = None) -> dict:
    """Load and validate an afsft-v1 file. Never unpickles code (weights_only=True)."""
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
    if not isinstance(data, dict) or data.get("format") != DATASET_FORMAT:
        raise DatasetError(f"{path}: format tag is not {DATASET_FORMAT!r}")
    if not isinstance(data.get("env"), str):
        raise DatasetError(f"{path}: field 'env' must be a string")
    if env_name is not None and SHORT_NAMES.get(data["env"], data["env"]) != SHORT_NAMES.get(env_name, env_name):
        raise DatasetError(f"{path}: collected on env {data['env']!r}, but --env is {env_name!r}")
    episodes = data.get("episodes")
    if not isinstance(episodes, list) or not episodes:
        raise DatasetError(f"{path}: field 'episodes' must be a non-empty list")
    for i, ep in enumerate(episodes):
        where = f"{path}: episode {i}"
        if not isinstance(ep, dict):
            raise DatasetError(f"{where}: must be a dict")
        images = ep.get("images")
        if not (isinstance(images, torch.Tensor) and images.dtype == torch.uint8 and images.ndim == 4
                and images.shape[-1] == 3 and len(images) > 0):
            raise DatasetError(f"{where}: field 'images' must be a non-empty uint8 tensor [T,H,W,3]")
        T = len(images)
        for key in ("prompts", "actions"):
            if not (isinstance(ep.get(key), list) and len(ep[key]) == T and all(isinstance(s, str) for s in ep[key])):
                raise DatasetError(f"{where}: field '{key}' must be a list of {T} strings")
        for key, dtype in (("rewards", torch.float32), ("valid", torch.bool)):
            if not (isinstance(ep.get(key), torch.Tensor) and ep[key].dtype == dtype and ep[key].shape == (T,)):
                raise DatasetError(f"{where}: field '{key}' must be a {dtype} tensor of shape [{T}]")
        if not torch.isfinite(ep["rewards"]).all():
            raise DatasetError(f"{where}: field 'rewards' holds NaN or inf")
        for key in ("terminated", "truncated"):
            if not isinstance(ep.get(key), bool):
                raise DatasetError(f"{where}: field '{key}' must be a bool")


def collect(args) -> dict:
    env = make_env(args.env, scheme=args.scheme)
    rng = np.random.default_rng(args.seed)
    episodes = [collect_episode(env, args.policy, rng, seed=args.seed * 100_003 + i, invalid_rate=args.invalid_rate,
                                expert_fraction=args.expert_fraction) for i in range(args.episodes)]
    returns = [float(ep["rewards"].sum()) for ep in episodes]
    print(f"{args.episodes} episodes of {args.policy} on {args.env}: success {np.mean([env.success(r) for r in returns]):.2f}, "
          f"mean return {np.mean(returns):.3f}, valid actions {torch.cat([e['valid'] for e in episodes]).float().mean():.2f}")
    return {"format": DATASET_FORMAT, "env": args.env, "episodes": episodes}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect", help="run a scripted policy and save an afsft-v1 dataset")
    c.add_argument("--env", default="babyai", help="short name or full id (default: babyai)")
    c.add_argument("--policy", default="mixed", choices=["random", "expert", "suboptimal", "mixed"])
    c.add_argument("--expert-fraction", type=float, default=0.3, help="mixed: chance an episode is expert (default: 0.3)")
    c.add_argument("--invalid-rate", type=float, default=0.2, help="suboptimal: chance of invalid text per turn (default: 0.2)")
    c.add_argument("--episodes", type=int, default=300, help="number of episodes (default: 300)")
    c.add_argument("--seed", type=int, default=0, help="seed of episodes and policies (default: 0)")
    c.add_argument("--scheme", default="tag", choices=sorted(SCHEMES), help="prompting scheme (default: tag)")
    c.add_argument("--out", default="data.pt", help="output file (default: data.pt)")
    args = parser.parse_args(argv)
    if args.episodes < 1 or not 0 <= args.expert_fraction <= 1 or not 0 <= args.invalid_rate <= 1:
        parser.error("--episodes must be >= 1 and --expert-fraction, --invalid-rate in [0, 1]")
    try:
        data = collect(args)
    except ValueError as err:
        parser.exit(2, f"envs.py: error: {err}\n")
    torch.save(data, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
