"""parallel_grid.py: collect datasets and train many afsft.py runs at once, under a deadline.

    python experiments/parallel_grid.py default/babyai/mixed03/0 sft/babyai/mixed03/0 ... \
        --workers 14 --limit 490 --out results.jsonl

A job is VARIANT/ENV/DATA/SEED: VARIANT one of `default` (afsft.py's defaults), `sft` (--filter none) and
`exp` (--drop-margin inf); ENV an afsft --env; DATA one of expert, mixed03, mixed01, random. Each dataset
(300 episodes, collected at SEED) is collected once, by the first job that needs it, into data/; each run
trains at SEED into runs/VARIANT-ENV-DATA-sSEED. Jobs start in the order given. A job starts only while the
time left exceeds the longest run so far (`--first-estimate` before any has finished); at `--limit`
seconds, runs still going are killed. Each finished run appends one JSON line (its eval.json, wall time)
to `--out`.

Made for a machine with many cores and one GPU (14 runs at once on an H200 took 250-290 s each for
BabyAI, 165-270 s for the cards); on 2 cores use --workers 2.
"""
import argparse
import json
import os
import subprocess
import sys
import threading
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
DATA = {"expert": ["expert"], "mixed03": ["mixed", "--expert-fraction", "0.3"],
        "mixed01": ["mixed", "--expert-fraction", "0.1"], "random": ["random"]}
VARIANTS = {"default": [], "sft": ["--filter", "none"], "exp": ["--drop-margin", "inf"]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("jobs", nargs="+", help="VARIANT/ENV/DATA/SEED")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--limit", type=float, default=3600, help="seconds until runs still going are killed")
    p.add_argument("--first-estimate", type=float, default=200, help="seconds a run is assumed to take")
    p.add_argument("--out", default="results.jsonl")
    p.add_argument("--extra", default="", help="more afsft.py flags for every run, e.g. '--offline-steps 10'")
    opt = p.parse_args()
    jobs = []
    for job in opt.jobs:
        variant, env_name, data, seed = job.split("/")
        if variant not in VARIANTS or data not in DATA:
            sys.exit(f"{job}: VARIANT must be one of {sorted(VARIANTS)}, DATA one of {sorted(DATA)}")
        jobs.append((variant, env_name, data, int(seed)))
    os.makedirs("runs", exist_ok=True)
    os.makedirs("data", exist_ok=True)
    start, lock, dataset_locks = time.time(), threading.Lock(), {}
    durations, running = [], set()
    results = open(opt.out, "a")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")

    def record(line):
        with lock:
            results.write(json.dumps(line) + "\n")
            results.flush()

    def dataset(env_name, data, seed):
        path = f"data/{env_name.replace('/', '_')}-{data}-s{seed}.pt"
        with lock:
            path_lock = dataset_locks.setdefault(path, threading.Lock())
        with path_lock:
            if not os.path.exists(path):
                command = [sys.executable, os.path.join(ROOT, "envs.py"), "collect", "--env", env_name,
                           "--policy", *DATA[data], "--seed", str(seed), "--out", path]
                done = subprocess.run(command, env=env, capture_output=True, text=True)
                record({"collect": path, "rc": done.returncode, "log": (done.stdout + done.stderr)[-300:]})
        return path

    def worker():
        while True:
            with lock:
                estimate = max(durations) if durations else opt.first_estimate
                if not jobs or opt.limit - (time.time() - start) < 1.05 * estimate:
                    return
                variant, env_name, data, seed = jobs.pop(0)
            name = f"{variant}-{env_name.replace('/', '_')}-{data}-s{seed}"
            path, began = dataset(env_name, data, seed), time.time()
            with open(f"runs/{name}.log", "w") as log:
                command = [sys.executable, os.path.join(ROOT, "afsft.py"), "--env", env_name, "--offline",
                           path, "--seed", str(seed), "--out", f"runs/{name}", *VARIANTS[variant],
                           *opt.extra.split()]
                run = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
                with lock:
                    running.add(run)
                rc = run.wait()
                with lock:
                    running.discard(run)
            wall = time.time() - began
            if rc == 0:
                with lock:
                    durations.append(wall)
            evaluated = f"runs/{name}/eval.json"
            result = json.load(open(evaluated)) if os.path.exists(evaluated) else {}
            record({"run": name, "rc": rc, "wall": round(wall), **result})

    threads = [threading.Thread(target=worker) for _ in range(opt.workers)]
    for thread in threads:
        thread.start()
    while any(t.is_alive() for t in threads) and time.time() - start < opt.limit:
        time.sleep(2)
    with lock:
        for run in running:
            run.kill()
    record({"end": round(time.time() - start), "not_started": len(jobs)})
    os._exit(0)  # workers still waiting on killed runs need not be joined


if __name__ == "__main__":
    main()
