"""results.py: the paper's three results in one table, in one command: collect, train, evaluate, aggregate.

    python experiments/results.py                         # the full table (about 75 CPU hours, see below)
    python experiments/results.py --quick                 # a smoke-sized table in <= 30 minutes on 2 cores
    python experiments/results.py --domains numberline --datasets random --methods sft,afsft --seeds 1 \\
        --offline-steps 20 --episodes 30                  # one cell, to check the pipeline end to end

For each domain and seed S it runs, as subprocesses of `afsft.py` with seed S and afsft.py's defaults:
- `prompted`:     the base evaluated untrained (`--offline-steps 0`): the paper's "prompting" row;
- `online`:       AFSFT online from the base, no dataset (`--offline-steps 0 --online-rounds K`);
and for each dataset it collects with seed S (`envs.py collect`):
- `sft`:          offline SFT, `--filter none`;
- `afsft`:        offline AFSFT with afsft.py's default flags, plus `--afsft-flags` if given (for example
                  the paper's plain form, README "What makes the critic robust");
- `afsft-online`: the `afsft` run continued online, `--resume` on a copy of it with `--online-rounds K`
                  (folder `afsft-online<K>`, so that another K reuses the offline runs), with the same flags
                  and then `--online-flags`, if given (their own folder: `afsft-online50-max-weight_1`).
Every run logs the success rate every few steps (`--eval-every`, for experiments/plot.py) and ends with
afsft.py's greedy evaluation (`eval.json`). The scripted expert plays the same evaluation episodes, for
its success rate. Everything goes under `experiments/runs/<settings>/`; a run whose `eval.json`
exists is skipped and a run killed halfway resumes from its checkpoint, so the command can be rerun
until it has finished. The table, mean +- std over seeds, goes to `experiments/results.md`; `--table-only`
writes it from the runs that exist, running nothing.

Domains, all from the images alone: numberline, ezpoints, blackjack (gym_cards), gotoredball, gotolocal
(BabyAI), click-button, click-dialog (MiniWoB++, which needs chromium); groups: cards, babyai,
miniwob, all. Datasets: random, mixed-0.1, mixed-0.3 (`--policy mixed --expert-fraction F`); `mixed` is both.

Cost on these 2-core machines, one thread per process, the pretrained tiny base with LoRA (2026-12-02,
two runs at a time): 1,000 offline steps plus the evaluations took 770-1,480 s per run on the cards and
BabyAI, and 50 online rounds 380-690 s; so about 2,600 CPU s per domain, dataset and seed for the three
dataset runs, plus about 600 per domain and seed for the two without one. The MiniWoB tasks cost 2-5x
as much per step (their prompts list the page). The full table is about 75 CPU hours, most of it the
MiniWoB rows: about 37 hours with --jobs 2 on 2 cores.
--quick keeps one seed, one dataset (mixed-0.3), the cards and BabyAI domains (MiniWoB needs a browser and
its long prompts make its evaluations slow), 80 offline steps, 3 online rounds, 60 episodes and 20
evaluation episodes. Measured on 2026-12-02 (--jobs 2 on 2 cores) with `--domains all`: 3,309 s wall and
5,879 CPU s, of which click-dialog took 2,529 CPU s and click-button 915 (40 steps each); the five
domains that --quick now runs took 2,360 CPU s (NumberLine 293, EZPoints 418, Blackjack 419, GoToRedBall
583, GoToLocal 647), about 20 minutes on 2 cores. That subset was summed from the runs' own
cost.json, not timed alone.
Such short runs show that everything runs end to end, not which method wins.
"""
import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
import envs  # noqa: E402
from afsft import Args  # noqa: E402  (afsft.py's defaults)

# name: (title, --env, --text-view)
DOMAINS = {
    "numberline": ("NumberLine", "numberline", False),
    "ezpoints": ("EZPoints", "ezpoints", False),
    "blackjack": ("Blackjack", "blackjack", False),
    "gotoredball": ("BabyAI GoToRedBall", "BabyAI-GoToRedBall-v0", False),
    "gotolocal": ("BabyAI GoToLocal", "BabyAI-GoToLocal-v0", False),
    "click-button": ("MiniWoB click-button", "miniwob/click-button-v1", False),
    "click-dialog": ("MiniWoB click-dialog", "miniwob/click-dialog-v1", False),
}
GROUPS = {"cards": ["numberline", "ezpoints", "blackjack"], "babyai": ["gotoredball", "gotolocal"],
          "miniwob": ["click-button", "click-dialog"], "all": list(DOMAINS)}
DATASETS = {"random": ["--policy", "random"],
            "mixed-0.1": ["--policy", "mixed", "--expert-fraction", "0.1"],
            "mixed-0.3": ["--policy", "mixed", "--expert-fraction", "0.3"]}
METHODS = {"prompted": "prompted base", "sft": "SFT (offline)", "afsft": "AFSFT (offline)",
           "afsft-online": "AFSFT offline -> online", "online": "AFSFT online only"}
DATA_FREE = ("prompted", "online")  # runs without a dataset: one per domain and seed, shown on every row
# Success rates (%) reported by RL4VLM (Zhai et al., 2024, "Fine-Tuning Large Vision-Language Models as
# Decision-Making Agents via Reinforcement Learning", Table 2) for their RL on a 7B LLaVA: not run here.
RL4VLM = {"numberline": 89.4, "ezpoints": 50.0, "blackjack": 40.2}
AFSFT_FLAGS = ""  # afsft.py's defaults


def names(text, table, groups=None):
    chosen = []
    for name in text.split(","):
        expanded = (groups or {}).get(name, [name])
        if any(n not in table for n in expanded):
            sys.exit(f"results.py: error: unknown name {name!r}; "
                     f"choose from {sorted(table) + sorted(groups or {})}")
        chosen += [n for n in expanded if n not in chosen]
    return chosen


# ---------------------------------------------------------------------------
# Running subprocesses: one log per step, CPU time from os.wait4
# ---------------------------------------------------------------------------
lock = threading.Lock()
cpu_used = [0.0]  # CPU seconds of every subprocess this invocation started


def run(cmd, log_path):
    """Run `cmd` from the repository root, output to `log_path`. Returns (exit code, wall s, CPU s); the
    CPU time counts the subprocess and the descendants it waited for (not browsers left running)."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime
    with lock:
        cpu_used[0] += cpu
    return proc.returncode, time.perf_counter() - start, cpu


def show(path):
    """A path relative to the repository when it lies inside it."""
    inside = os.path.commonpath([os.path.abspath(path), REPO]) == REPO
    return os.path.relpath(path, REPO) if inside else path


def say(text):
    with lock:
        print(text, flush=True)


def collect(domain, dataset_args, episodes, seed, out):
    """`envs.py collect` unless `out` exists. Returns True when the file is there."""
    if os.path.exists(out):
        return True
    _, env, text_view = DOMAINS[domain]
    cmd = [sys.executable, "envs.py", "collect", "--env", env, *dataset_args, "--episodes", str(episodes),
           "--seed", str(seed), "--out", out + ".tmp"] + (["--text-view"] if text_view else [])
    code, wall, _ = run(cmd, out[:-3] + ".log")
    if code == 0:
        os.replace(out + ".tmp", out)
    say(f"collect {show(out)}: " + (f"{wall:.0f} s" if code == 0 else f"FAILED, see {out[:-3]}.log"))
    return code == 0


def expert_path(domain, opt):
    return os.path.join(opt.root, domain, f"expert-eval{opt.eval_episodes}.json")


def expert(domain, opt):
    """The scripted expert's success on the episodes afsft.py evaluates on (seeds envs.EVAL_SEED, ...), so
    that its column compares like with like: on Blackjack's 50 evaluation hands it wins 0.46, on 1,000
    others 0.41. Written once to expert-eval<N>.json; returns True when it is there."""
    path = expert_path(domain, opt)
    if os.path.exists(path):
        return True
    _, name, text_view = DOMAINS[domain]
    try:
        env = envs.make_env(name, **({"text_view": True} if text_view else {}))
    except envs.MissingDependency as err:
        say(f"expert {domain}: FAILED ({err})")
        return False
    try:
        seeds = range(envs.EVAL_SEED, envs.EVAL_SEED + opt.eval_episodes)
        rng = np.random.default_rng(0)  # the expert draws nothing from it
        wins = [env.success(float(envs.collect_episode(env, "expert", rng, seed)["rewards"].sum()))
                for seed in seeds]
    finally:
        env.close()
    with open(path, "w") as f:
        json.dump({"success_rate": float(np.mean(wins)), "episodes": len(wins)}, f)
    return True


def offline_steps(domain, opt):
    """--quick halves the MiniWoB tasks' steps: their page-listing prompts make a step 2-5x dearer."""
    return opt.offline_steps // 2 if opt.quick and domain in GROUPS["miniwob"] else opt.offline_steps


def train(run_dir, domain, data, seed, opt, extra=()):
    """One `afsft.py` run unless its eval.json exists; resumes from its checkpoint if it has one. Without
    `data` the run has no offline steps: the base evaluated as it is, or trained online only."""
    if os.path.exists(os.path.join(run_dir, "eval.json")):
        return True
    _, env, text_view = DOMAINS[domain]
    cmd = [sys.executable, "afsft.py", "--env", env, "--seed", str(seed),
           "--eval-episodes", str(opt.eval_episodes), "--eval-every", str(opt.eval_every),
           "--log-every", str(opt.log_every), *extra]
    cmd += ["--offline", data, "--offline-steps", str(offline_steps(domain, opt))] if data else [
        "--offline-steps", "0"]
    cmd += ["--text-view"] if text_view else []
    if os.path.exists(os.path.join(run_dir, "checkpoint", "state.pt")):
        cmd += ["--resume", run_dir]
    else:
        shutil.rmtree(run_dir, ignore_errors=True)  # a start that never reached a checkpoint
        os.makedirs(run_dir)
        cmd += ["--out", run_dir]
    code, wall, cpu = run(cmd, os.path.join(run_dir, "log.txt"))
    name = os.path.relpath(run_dir, opt.root)
    if code:
        say(f"train {name}: FAILED (exit {code}), see {run_dir}/log.txt")
        return False
    with open(os.path.join(run_dir, "cost.json"), "w") as f:
        json.dump({"wall_s": wall, "cpu_s": cpu}, f)
    result = read_json(os.path.join(run_dir, "eval.json"))
    say(f"train {name}: success {result['success_rate']:.2f}, valid {result['valid_action_rate']:.2f} "
        f"({wall:.0f} s wall, {cpu:.0f} s CPU)")
    return True


def flags_name(flags):
    return "_".join(flag.lstrip("-") for flag in flags)


def run_name(method, opt):
    if method not in ("afsft-online", "online"):
        return method
    return (f"{method}{opt.online_rounds}"
            + (f"-{flags_name(opt.online_flags)}" if opt.online_flags else ""))


def online_args(opt):
    """afsft.py flags of an online run, from the base or from a copy of the afsft run."""
    return [*opt.afsft_flags, *opt.online_flags, "--online-rounds", str(opt.online_rounds)]


def data_free(domain, seed, opt):
    """The runs without a dataset: the prompted base (evaluated untrained) and AFSFT online from the base."""
    where = os.path.join(opt.root, domain, f"seed{seed}")
    os.makedirs(where, exist_ok=True)
    if "prompted" in opt.methods:
        train(os.path.join(where, "prompted"), domain, None, seed, opt)
    if "online" in opt.methods:
        train(os.path.join(where, run_name("online", opt)), domain, None, seed, opt,
              online_args(opt))


def chain(domain, dataset, seed, opt):
    """Collect one dataset, then its runs; afsft-online starts from a copy of the finished afsft run."""
    where = os.path.join(opt.root, domain, dataset, f"seed{seed}")
    os.makedirs(where, exist_ok=True)
    data = os.path.join(where, "data.pt")
    if not collect(domain, DATASETS[dataset], opt.episodes, seed, data):
        return
    if "sft" in opt.methods:
        train(os.path.join(where, "sft"), domain, data, seed, opt, ["--filter", "none"])
    if {"afsft", "afsft-online"} & set(opt.methods):
        done = train(os.path.join(where, "afsft"), domain, data, seed, opt, opt.afsft_flags)
        online = os.path.join(where, run_name("afsft-online", opt))
        if done and "afsft-online" in opt.methods:
            if not os.path.exists(online):
                shutil.rmtree(online + ".tmp", ignore_errors=True)
                # the copy is not finished, and its cost is afsft's (a run copied in may have no cost.json)
                shutil.copytree(os.path.join(where, "afsft"), online + ".tmp",
                                ignore=shutil.ignore_patterns("eval.json", "cost.json"))
                os.replace(online + ".tmp", online)
            train(online, domain, data, seed, opt,
                  online_args(opt))


# ---------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------
def read_json(path):
    with open(path) as f:
        return json.load(f)


def dataset_rates(path):
    """Success (return > 0, the envs' `success()`, RL4VLM's definition) and valid-action rate of a dataset."""
    episodes = envs.load_dataset(path)["episodes"]
    success = np.mean([float(ep["rewards"].sum()) > 0 for ep in episodes])
    return float(success), float(torch.cat([ep["valid"] for ep in episodes]).float().mean())


def mean_std(values):
    if not values:
        return "-"
    std = f" ± {np.std(values, ddof=1):.2f}" if len(values) > 1 else ""
    return f"{np.mean(values):.2f}{std}"


def rates(where, method, opt):
    """(success, valid-action rate) of one seed's dataset (method None) or finished run, or None. `where`
    is the seed's folder of a dataset; the runs without one sit a level up."""
    if method is None:
        path = os.path.join(where, "data.pt")
        return dataset_rates(path) if os.path.exists(path) else None
    if method in DATA_FREE:
        where = os.path.join(os.path.dirname(os.path.dirname(where)), os.path.basename(where))
    path = os.path.join(where, run_name(method, opt), "eval.json")
    if not os.path.exists(path):
        return None
    result = read_json(path)
    return result["success_rate"], result["valid_action_rate"]


def cell(results, seeds):
    """Success mean ± std over the seeds, the valid-action rate in brackets, [n] where fewer seeds
    finished."""
    if not results:
        return "-"
    success, valid = zip(*results)
    return (f"{mean_std(success)} ({np.mean(valid):.2f})"
            + (f" [{len(results)}]" if len(results) < seeds else ""))


def table(opt):
    columns = [None] + opt.methods  # None: the dataset itself
    online = bool({"afsft-online", "online"} & set(opt.methods))
    miniwob_steps = offline_steps("click-button", opt)
    lines = [f"# Results: {' vs '.join(METHODS[m] for m in opt.methods)}", "",
             f"Made by `python experiments/results.py {shlex.join(sys.argv[1:])}` into `{show(opt.root)}`.",
             f"The pretrained tiny base (`--model tiny`), {opt.episodes} dataset episodes, "
             f"{opt.offline_steps} offline steps"
             + (f" ({miniwob_steps} on the MiniWoB tasks)" if miniwob_steps != opt.offline_steps else "")
             + (f", online rounds: {opt.online_rounds}" if online else "")
             + (f" with `{' '.join(opt.online_flags)}` added"
                if online and opt.online_flags else "")
             + (f"; AFSFT with `{' '.join(opt.afsft_flags)}`, afsft.py's defaults otherwise; "
                if opt.afsft_flags else "; AFSFT with afsft.py's default flags, SFT with `--filter none`; ")
             + f"greedy evaluation on {opt.eval_episodes} held-out episodes; each seed its own dataset. "
             "Every task runs from the images alone.", "",
             "Each cell: greedy success rate, mean ± std over the seeds, and (in brackets) the share of "
             "turns whose text was a valid action. Success: the episode's return is > 0. [n]: only n seeds "
             "have finished. The expert is the scripted solver on the same evaluation episodes; RL4VLM is "
             "their RL on a 7B LLaVA (their Table 2, not run here).", "",
             "| task | dataset | seeds | the dataset | " + " | ".join(METHODS[m] for m in opt.methods)
             + " | expert | RL4VLM |", "|---" * (len(columns) + 5) + "|"]
    header_lines = len(lines)
    for domain in opt.domains:
        path = expert_path(domain, opt)
        expert_rate = f"{read_json(path)['success_rate']:.2f}" if os.path.exists(path) else "-"
        theirs = f"{RL4VLM[domain] / 100:.3f}" if domain in RL4VLM else ""
        for dataset in opt.datasets:
            wheres = [os.path.join(opt.root, domain, dataset, f"seed{seed}") for seed in range(opt.seeds)]
            results = [[r for r in (rates(w, method, opt) for w in wheres) if r] for method in columns]
            if any(results):  # a task and dataset that nothing has run on is left out
                seeds = max(map(len, results))
                lines.append(f"| {DOMAINS[domain][0]} | {dataset} | {seeds} | "
                             + " | ".join(cell(r, seeds) for r in results) + f" | {expert_rate} | {theirs} |")
    if len(lines) == header_lines:
        lines.append("| (no finished runs yet) |")
    return "\n".join(lines) + "\n"


def total_cost(root):
    """CPU and wall seconds recorded by every finished run under `root` (this invocation or earlier ones)."""
    cpu = wall = 0.0
    for folder, _, files in os.walk(root):
        if "cost.json" in files:
            cost = read_json(os.path.join(folder, "cost.json"))
            cpu, wall = cpu + cost["cpu_s"], wall + cost["wall_s"]
    return cpu, wall


def run_all(opt):
    with ThreadPoolExecutor(opt.jobs) as pool:
        tasks = []
        for d in opt.domains:
            os.makedirs(os.path.join(opt.root, d), exist_ok=True)
            tasks.append(pool.submit(expert, d, opt))
        # MiniWoB: long prompts
        slow_first = sorted(opt.domains, key=lambda d: d.startswith("click"), reverse=True)
        tasks += [pool.submit(chain, d, ds, s, opt) for s in range(opt.seeds) for d in slow_first
                  for ds in opt.datasets]
        if set(DATA_FREE) & set(opt.methods):
            tasks += [pool.submit(data_free, d, s, opt) for s in range(opt.seeds) for d in slow_first]
        for task in tasks:
            task.result()  # re-raises a crash of this script (a failed subprocess is only reported)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--domains", default=None,
                   help="comma-separated domains or groups (default: all; --quick: cards,babyai)")
    p.add_argument("--datasets", default=None,
                   help="random, mixed-0.1, mixed-0.3, mixed (default: all; --quick: mixed-0.3)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"{', '.join(METHODS)} (default: all)")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default: 3; --quick: 1)")
    p.add_argument("--episodes", type=int, default=None,
                   help="episodes per dataset (default: 300; --quick: 60)")
    p.add_argument("--offline-steps", type=int, default=None,
                   help=f"afsft.py --offline-steps (default: afsft.py's, {Args().offline_steps}; "
                   "--quick: 80, 40 on MiniWoB)")
    p.add_argument("--online-rounds", type=int, default=None,
                   help="afsft.py --online-rounds, rounds (default: 50; --quick: 3)")
    p.add_argument("--eval-episodes", type=int, default=None,
                   help="final evaluation episodes (default: 50; --quick: 20)")
    p.add_argument("--eval-every", type=int, default=None,
                   help="steps between learning-curve points (default: offline steps / 5)")
    p.add_argument("--afsft-flags", default=AFSFT_FLAGS,
                   help=f"afsft.py flags of the AFSFT runs (default: {AFSFT_FLAGS!r})")
    p.add_argument("--online-flags", default="", help="afsft.py flags added for the online rounds only, "
                   "for instance '--max-weight 1' (default: none)")
    p.add_argument("--jobs", type=int, default=2,
                   help="subprocess chains run in parallel (default: 2, for 2 cores)")
    p.add_argument("--table-only", action="store_true",
                   help="run nothing: write the table from the runs that exist")
    p.add_argument("--quick", action="store_true",
                   help="one seed, one dataset, fewer steps and episodes (<= 30 min on 2 cores)")
    p.add_argument("--out", default=os.path.join(HERE, "runs"),
                   help="runs go in OUT/<settings>/ (default: experiments/runs)")
    p.add_argument("--table", default=os.path.join(HERE, "results.md"),
                   help="markdown table (default: experiments/results.md)")
    opt = p.parse_args()
    defaults = {"domains": "cards,babyai" if opt.quick else "all",
                "datasets": "mixed-0.3" if opt.quick else "random,mixed", "seeds": 1 if opt.quick else 3,
                "episodes": 60 if opt.quick else 300,
                "offline_steps": 80 if opt.quick else Args().offline_steps,
                "online_rounds": 3 if opt.quick else 50, "eval_episodes": 20 if opt.quick else 50}
    for key, value in defaults.items():
        if getattr(opt, key) is None:
            setattr(opt, key, value)
    opt.domains = names(opt.domains, DOMAINS, GROUPS)
    opt.datasets = names(opt.datasets, DATASETS, {"mixed": ["mixed-0.1", "mixed-0.3"]})
    opt.methods = names(opt.methods, METHODS)
    if min(opt.seeds, opt.episodes, opt.offline_steps, opt.jobs,
           opt.eval_episodes) < 1 or opt.online_rounds < 0:
        p.error("--seeds, --episodes, --offline-steps, --jobs, --eval-episodes must be >= 1, "
                "--online-rounds >= 0")
    opt.eval_every = opt.eval_every or max(1, opt.offline_steps // 5)
    opt.log_every = math.gcd(opt.eval_every, 25)  # afsft.py evaluates on log steps only
    opt.afsft_flags, opt.online_flags = opt.afsft_flags.split(), opt.online_flags.split()
    opt.root = os.path.join(os.path.abspath(opt.out),
                            f"ep{opt.episodes}-off{opt.offline_steps}-eval{opt.eval_episodes}x{opt.eval_every}"
                            + ("-quick" if opt.quick else "")
                            # other flags, other runs
                            + (f"-{flags_name(opt.afsft_flags)}" if opt.afsft_flags else ""))
    os.makedirs(opt.root, exist_ok=True)

    start = time.perf_counter()
    if not opt.table_only:
        run_all(opt)
    markdown = table(opt)
    with open(opt.table, "w") as f:
        f.write(markdown)
    print("\n" + markdown)
    cpu, wall = total_cost(opt.root)
    print(f"wrote {opt.table}\nthis invocation: {time.perf_counter() - start:.0f} s wall, "
          f"{cpu_used[0]:.0f} s CPU in its subprocesses; the finished training runs under "
          f"{show(opt.root)}, this time or before: {cpu:.0f} s CPU, {wall:.0f} s wall")


if __name__ == "__main__":
    main()
