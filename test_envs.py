"""Tests of the gym_cards and MiniWoB++ domains in envs.py: parsers, rules, collection, check_env.

    python -m pytest -q test_envs.py

The MiniWoB tests skip, saying what to install, where Chromium is missing.
"""
import warnings
from fractions import Fraction

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs

CARDS = ["numberline", "ezpoints", "points24", "blackjack"]


def act(env, text, scheme="tag"):
    """Step with a response that carries `text` as its action."""
    return env.step(envs.format_response(text, scheme))


def checked(env):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(render fps|spec).*")  # no registry spec: made by make_env
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
@pytest.mark.parametrize("name, least", [("numberline", 1.0), ("ezpoints", 1.0), ("points24", 0.5), ("blackjack", 0.25)])
def test_cards_expert_success(name, least):
    env, rng = envs.make_env(name), np.random.default_rng(0)
    episodes = [envs.collect_episode(env, "expert", rng, seed=s) for s in range(40)]
    assert np.mean([env.success(float(ep["rewards"].sum())) for ep in episodes]) >= least


def test_blackjack_expert_follows_basic_strategy():
    env = envs.make_env("blackjack", seed=0)
    for player, up, action in [([10, 6], 7, "hit"), ([10, 6], 6, "stand"), ([10, 2], 3, "hit"), ([10, 2], 4, "stand"),
                               ([1, 7], 9, "hit"), ([1, 7], 8, "stand"), ([10, 7], 1, "stand"), ([5, 6], 6, "hit")]:
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


@pytest.mark.parametrize("name, scheme", [("numberline", "tag"), ("ezpoints", "json"), ("points24", "tag"), ("blackjack", "json")])
def test_cards_collect_round_trip(name, scheme, tmp_path):
    out = str(tmp_path / "data.pt")
    envs.main(["collect", "--env", name, "--policy", "mixed", "--episodes", "4", "--scheme", scheme, "--out", out])
    data = envs.load_dataset(out, env_name=name)
    assert data["env"] == name and len(data["episodes"]) == 4
    assert data["episodes"][0]["images"].shape[1:] == (300, 300, 3)


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


def test_miniwob_click_by_coordinates(click_test_2):
    env = click_test_2
    env.reset(seed=0)
    target = env.elements()[env.expert_action()]
    x, y = (int(target[k].item() + target[s].item() / 2) for k, s in (("left", "width"), ("top", "height")))
    assert act(env, f"click(x={x}, y={y})")[1] == 1.0


def test_miniwob_check_env_and_collect_round_trip(click_test_2, tmp_path):
    checked(click_test_2)
    rng = np.random.default_rng(0)
    episodes = [envs.collect_episode(click_test_2, "mixed", rng, seed=s) for s in range(3)]
    path = str(tmp_path / "data.pt")
    envs.torch.save({"format": envs.DATASET_FORMAT, "env": "miniwob", "episodes": episodes}, path)
    data = envs.load_dataset(path, env_name="miniwob/click-test-2-v1")
    assert data["episodes"][0]["images"].shape[1:] == (210, 160, 3)


@pytest.mark.parametrize("task", ["click-test", "click-button", "click-link", "click-dialog"])
def test_miniwob_expert_solves_easy_tasks(task):
    env = miniwob_env(task)
    try:
        rng = np.random.default_rng(0)
        assert all(envs.collect_episode(env, "expert", rng, seed=s)["rewards"].sum() == 1 for s in range(2))
    finally:
        env.close()
