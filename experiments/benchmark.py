"""benchmark.py: what an AFSFT update costs next to an SFT update, and how fast rollouts run.

    python experiments/benchmark.py --quick                 # about 4 minutes on an idle 2-core machine
    python experiments/benchmark.py --device cuda --sizes tiny,large
    python experiments/benchmark.py --quick --profile       # where AFSFT's extra time goes

It prints four sections: 1. Update cost, SFT (`--filter none`) against AFSFT (default flags, after its warm-
up) on the SAME batch (one `Buffer.sample` output), for each model size. One update is `afsft.gradient_step`,
what `afsft.train` does per step: `afsft_loss`, backward, gradient clipping, the optimizer step and the target
EMA. Times are medians of timed iterations after warm-up ones, the two methods interleaved. On CPU the time is
this process's CPU time, which other processes on the same cores do not inflate (wall-clock is printed beside
it); on CUDA it is wall-clock. Peak memory is measured in a fresh subprocess per size and method: on CUDA
`torch.cuda.max_memory_allocated`; on CPU the peak resident set size (Linux's VmHWM, reset after the model is
loaded) minus the process's size before the model was loaded, so it counts weights, gradients, optimizer state
and activations, as the CUDA number does (glibc is told to return freed tensors to the OS at once, so the peak
follows the live tensors, not the allocator's cache). The bar (AFSFT at most 1.15x SFT's time and 1.10x its
memory) is printed as PASS or FAIL, never asserted. 2. Rollout throughput of `afsft.Rollout`: env steps per
second against --num-envs, tiny model. 3. Update time against response length (tokens per response) and
against --batch-turns, tiny model. 4. With --profile: AFSFT's update split into parts, and torch.profiler's
top operators.

Sizes: `tiny` is afsft's default model (Llama text model of width 192, 3 layers); `large` is the same LLaVA
with a text model of width 512 and 8 layers and random weights, built here from the tiny base's config;
`--vocab` pads the vocabulary of `large` (rows the tokenizer never emits) to see how the critic head's cost
grows with the vocabulary, which is 1024 in the tiny tokenizer but 150k in Qwen2-VL."""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import afsft  # noqa: E402
import envs  # noqa: E402

LARGE = {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8, "num_attention_heads": 8}
REASONING = "I see the red ball ahead of me, so I should walk towards it and then stop next to it. "
TIME_BAR, MEMORY_BAR = 1.15, 1.10


# ---------------------------------------------------------------------------
# Models and the batch
# ---------------------------------------------------------------------------
def build_models(root, sizes, env, dataset, vocab):
    """afsft's tiny VLM, and for `large` the same LLaVA with a wider, deeper Llama (and optionally a
    padded vocabulary). Returns {size: model directory}."""
    from transformers import AutoProcessor, LlavaConfig, LlavaForConditionalGeneration

    paths = {"tiny": afsft.TINY_BASE}
    if "large" in sizes:
        paths["large"] = os.path.join(root, "large")
        config = LlavaConfig.from_pretrained(paths["tiny"])
        for key, value in {**LARGE, "vocab_size": max(vocab, config.text_config.vocab_size)}.items():
            setattr(config.text_config, key, value)
        torch.manual_seed(0)
        LlavaForConditionalGeneration(config).save_pretrained(paths["large"])
        AutoProcessor.from_pretrained(paths["tiny"]).save_pretrained(paths["large"])
    return paths


def collect(env, episodes, seed=0):
    """A BabyAI dataset like the results' (mixed, 30% expert), collected in-process."""
    rng = np.random.default_rng(seed)
    return {"episodes": [envs.collect_episode(env, "mixed", rng, seed=seed * 100_003 + i)
                         for i in range(episodes)]}


def lengthen(batch, tokens):
    """The same batch with every response made long enough that `encode` cuts it to `tokens` tokens
    (tokens - 1 of text plus EOS), as a model that reasons before it acts would write."""
    return {**batch, "actions": [REASONING * (1 + tokens // 8) + a for a in batch["actions"]]}


def save_batch(batch, path):
    """The batch as tensors, strings and lists only, so that the workers load it with weights_only=True."""
    out = dict(batch)
    for key in ("images", "boot_images"):
        out[key] = (torch.from_numpy(np.stack(batch[key])) if len(batch[key])
                    else torch.zeros(0, dtype=torch.uint8))
    torch.save(out, path)


def load_batch(path):
    batch = torch.load(path, weights_only=True)
    for key in ("images", "boot_images"):
        batch[key] = [image.numpy() for image in batch[key]]
    return batch


def method_args(method, device, **changes):
    """afsft's defaults, with the filter off for SFT."""
    args = afsft.Args(device=str(device), **changes)
    return afsft.replace(args, filter="none") if method == "sft" else args


def load(path, args, device):
    torch.manual_seed(0)
    agent = afsft.load_agent(args, path).to(device)
    params = [p for p in agent.parameters() if p.requires_grad]
    return agent, params, torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)


def update(agent, params, optimizer, batch, args, device):
    """One training step: afsft.py's own `gradient_step`, AFSFT with its filter on (past the warm-up)."""
    afsft.gradient_step(agent, optimizer, batch, args, warmup=False, device=device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def clock(device):
    """Seconds of this process's CPU time on CPU (other processes sharing the cores do not count
    against it; with one thread it equals wall time on an idle machine), wall-clock seconds on CUDA."""
    sync(device)
    return time.perf_counter() if device.type == "cuda" else time.process_time()


def time_methods(agent, params, optimizer, batch, runs, device, warmup, iters):
    """Median (clock, wall) seconds per update for each (name, args) in `runs`, interleaved: ABAB.., BABA.."""
    seconds = {name: [] for name, _ in runs}
    for i in range(warmup + iters):
        for name, args in (runs if i % 2 == 0 else runs[::-1]):
            start, wall = clock(device), time.perf_counter()
            update(agent, params, optimizer, batch, args, device)
            if i >= warmup:
                seconds[name].append((clock(device) - start, time.perf_counter() - wall))
    return {name: tuple(statistics.median(x) for x in zip(*s)) for name, s in seconds.items()}


# ---------------------------------------------------------------------------
# Peak memory, one fresh process per (size, method)
# ---------------------------------------------------------------------------
def status_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def memory_worker(spec):
    """Runs in a subprocess: load the model, take `updates` steps on the saved batch, print the peak."""
    import transformers  # noqa: F401  (imported before the baseline: libraries are not the model)

    transformers.logging.set_verbosity_error()
    device = torch.device(spec["device"])
    batch = load_batch(spec["batch"])
    args = method_args(spec["method"], device, finetune=spec["finetune"])
    before = status_kb("VmRSS") if device.type == "cpu" else 0
    agent, params, optimizer = load(spec["model"], args, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:  # Linux: reset the high-water mark to the current size, so the model's loading spike is not counted
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    for _ in range(spec["updates"]):
        update(agent, params, optimizer, batch, args, device)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else (status_kb("VmHWM") - before) * 1024)
    print(json.dumps({"peak_bytes": peak}))


def peak_memory(model, batch_file, device, finetune, updates):
    """{method: peak bytes}, SFT and AFSFT measured in two fresh processes that run side by side."""
    # glibc: serve every allocation over 64 KiB by mmap and unmap it when freed, so that the resident size
    # follows the live tensors instead of the allocator's cache (peaks then repeat to within 1 MB)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    workers = {}
    for method in ("sft", "afsft"):
        spec = {"model": model, "method": method, "batch": batch_file, "device": str(device),
                "finetune": finetune, "updates": updates}
        workers[method] = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker",
                                            json.dumps(spec)],
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peaks = {}
    for method, worker in workers.items():
        out, err = worker.communicate()
        if worker.returncode:
            sys.exit(f"memory worker ({method}) failed:\n{err[-2000:]}")
        peaks[method] = json.loads(out.strip().splitlines()[-1])["peak_bytes"]
    return peaks


# ---------------------------------------------------------------------------
# The four sections
# ---------------------------------------------------------------------------
def verdict(ratio, bar):
    return f"{ratio:.3f}x {'PASS' if ratio <= bar else 'FAIL'} (bar {bar:.2f}x)"


def update_cost(paths, batch, batch_file, device, opt):
    cpu = device.type == "cpu"
    print(f"\n## 1. Update cost, SFT vs AFSFT on the same batch ({len(batch['prompts'])} turns, "
          f"{len(batch['boot_prompts'])} bootstrap prompts, --finetune {opt.finetune})")
    print(f"time: median of {opt.iters} updates after {opt.warmup} warm-up, SFT and AFSFT interleaved; "
          + ("'s' is this process's CPU time (time.process_time), 'wall' is wall-clock" if cpu
             else "'s' is wall-clock"))
    print("memory: " + ("peak RSS (VmHWM) of a fresh process minus its size before the model was loaded"
                        if cpu else "torch.cuda.max_memory_allocated in a fresh process"))
    print("| size | trainable params | SFT s | AFSFT s | time ratio | wall ratio | SFT peak MB "
          "| AFSFT peak MB | memory ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    ratios = {}
    for size, path in paths.items():
        runs = [(m, method_args(m, device, finetune=opt.finetune)) for m in ("sft", "afsft")]
        agent, params, optimizer = load(path, runs[1][1], device)
        s = time_methods(agent, params, optimizer, batch, runs, device, opt.warmup, opt.iters)
        n_params = sum(p.numel() for p in params)
        del agent, params, optimizer
        peak = peak_memory(path, batch_file, device, opt.finetune, opt.memory_updates)
        ratios[size] = (s["afsft"][0] / s["sft"][0], s["afsft"][1] / s["sft"][1], peak["afsft"] / peak["sft"])
        print(f"| {size} | {n_params:,} | {s['sft'][0]:.3f} | {s['afsft'][0]:.3f} | {ratios[size][0]:.3f} | "
              f"{ratios[size][1]:.3f} | {peak['sft'] / 2**20:.0f} | {peak['afsft'] / 2**20:.0f} | "
              f"{ratios[size][2]:.3f} |")
    for size, (t, wall, m) in ratios.items():
        print(f"{size}: time {verdict(t, TIME_BAR)}" + (f", wall {verdict(wall, TIME_BAR)}" if cpu else "")
              + f", memory {verdict(m, MEMORY_BAR)}")
    return ratios


def rollout_throughput(path, device, opt):
    print(f"\n## 2. Rollout throughput: afsft.Rollout on {opt.env}, tiny model, sampling at temperature 1, "
          f"responses of up to {afsft.Args.max_new_tokens} tokens, {opt.rollout_turns} batched turns "
          "after 1 warm-up")
    print("| --num-envs | env steps/s | env steps per CPU s | s per batched turn |")
    print("|---|---|---|---|")
    for n in opt.num_envs:
        args = method_args("afsft", device, env=opt.env, text_view=opt.text_view, num_envs=n)
        agent, _, _ = load(path, args, device)
        rollout = afsft.Rollout(args, seed=0)
        rollout.step(agent, args, args.temperature, device)  # warm-up
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(opt.rollout_turns):
            rollout.step(agent, args, args.temperature, device)
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        rollout.close()
        steps = n * opt.rollout_turns
        print(f"| {n} | {steps / wall:.1f} | {steps / cpu:.1f} | {wall / opt.rollout_turns:.3f} |")


def scaling(path, buffer, device, opt):
    print(f"\n## 3. Update time against response length and batch size, tiny model "
          f"(median of {opt.scaling_iters} after 1 warm-up)")
    agent, params, optimizer = load(path, method_args("afsft", device, finetune=opt.finetune), device)

    def row(label, batch, **changes):
        runs = [(m, method_args(m, device, finetune=opt.finetune, **changes)) for m in ("sft", "afsft")]
        s = time_methods(agent, params, optimizer, batch, runs, device, 1, opt.scaling_iters)
        print(f"| {label} | {len(batch['boot_prompts'])} | {s['sft'][0]:.3f} | {s['afsft'][0]:.3f} | "
              f"{s['afsft'][0] / s['sft'][0]:.3f} |")

    def tokens(batch, n):  # mean tokens per response, as encode cuts them
        return afsft.encode(agent.processor, batch["images"], batch["prompts"], batch["actions"],
                            n)[3].float().mean()

    batch = buffer.sample(np.random.default_rng(0), afsft.Args.batch_turns, afsft.Args.run_length)
    print("| tokens per response (32 turns) | bootstrap prompts | SFT s | AFSFT s | ratio |\n"
          "|---|---|---|---|---|")
    row(f"{tokens(batch, afsft.Args.max_new_tokens):.1f} (the dataset's own)", batch)
    for n in opt.lengths:
        row(f"{tokens(lengthen(batch, n), n):.1f}", lengthen(batch, n), max_new_tokens=n)
    print("| --batch-turns (dataset's responses) | bootstrap prompts | SFT s | AFSFT s | ratio |\n"
          "|---|---|---|---|---|")
    for b in opt.batches:
        row(str(b), buffer.sample(np.random.default_rng(0), b, afsft.Args.run_length))


def profile(path, batch, device, opt):
    """Where AFSFT's extra time goes: the parts of its loss timed alone, then torch.profiler's top ops."""
    print("\n## 4. Profile of the update, tiny model")
    args = method_args("afsft", device, finetune=opt.finetune)
    agent, params, optimizer = load(path, args, device)
    inputs, state_mask, _, _ = afsft.encode(agent.processor, batch["images"], batch["prompts"],
                                            batch["actions"], args.max_new_tokens)
    inputs, state_mask = inputs.to(device), state_mask.to(device)
    with torch.no_grad():
        h = agent.features(inputs, state_mask).float()
        logits = agent.vlm.get_output_embeddings()(h).float()
    parts = {  # name: (function, needs grad)
        "encode, the processor (both methods)": (lambda: afsft.encode(agent.processor, batch["images"],
                                                                       batch["prompts"], batch["actions"],
                                                                       args.max_new_tokens), False),
        "trunk + language head forward (both)":
            (lambda: agent.vlm.get_output_embeddings()(agent.features(inputs, state_mask)), True),
        "critic head forward (AFSFT)": (lambda: agent.critic(h), True),
        "target head + V = sum pi Q (AFSFT)": (lambda: afsft.state_values(logits, agent.target(h)), False),
        f"bootstrap: encode + forward of {len(batch['boot_prompts'])} prompts (AFSFT)":
            (lambda: afsft.bootstrap_values(agent, batch, None, device), False),
    }
    print("| part | ms, median |\n|---|---|")
    for name, (fn, grad) in parts.items():
        times = []
        for _ in range(1 + opt.iters):
            start = clock(device)
            with torch.set_grad_enabled(grad):
                fn()
            times.append(clock(device) - start)
        print(f"| {name} | {1000 * statistics.median(times[1:]):.1f} |")
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = device.type == "cuda"
    for name, run_args in (("SFT", method_args("sft", device, finetune=opt.finetune)), ("AFSFT", args)):
        update(agent, params, optimizer, batch, run_args, device)
        with torch_profile(activities=[ProfilerActivity.CPU]
                           + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            update(agent, params, optimizer, batch, run_args, device)
        print(f"\n{name} update, top 15 operators by self time:")
        print(prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                        row_limit=15))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    p.add_argument("--sizes", default="tiny,large", help="comma-separated: tiny, large (default: tiny,large)")
    p.add_argument("--quick", action="store_true",
                   help="fewer iterations: about 4 minutes on an idle 2-core machine")
    p.add_argument("--profile", action="store_true", help="also split AFSFT's update into parts (section 4)")
    p.add_argument("--env", default="babyai", help="env of the dataset and the rollouts (default: babyai)")
    p.add_argument("--text-view", action=argparse.BooleanOptionalAction, default=False,
                   help="prompts also describe the view in words (default: off, images only, as afsft.py)")
    p.add_argument("--finetune", default="lora", choices=["full", "lora"],
                   help="lora: afsft.py's default (adapters on the language model); full: every weight")
    p.add_argument("--vocab", type=int, default=0,
                   help="pad the large model's vocabulary to this size (default: no)")
    p.add_argument("--episodes", type=int, default=40,
                   help="dataset episodes the batches are sampled from (default: 40)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    opt = p.parse_args()
    if opt.worker:
        return memory_worker(json.loads(opt.worker))
    opt.warmup, opt.iters, opt.memory_updates = (1, 3, 2) if opt.quick else (3, 20, 3)
    opt.scaling_iters, opt.rollout_turns = (1, 3) if opt.quick else (6, 10)
    opt.num_envs, opt.lengths, opt.batches = [1, 4, 8, 16], [8, 16, 32, 64], [8, 16, 32, 64]
    sizes = opt.sizes.split(",")
    if not sizes or set(sizes) - {"tiny", "large"}:
        p.error("--sizes takes tiny and/or large")

    import transformers

    transformers.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if opt.device == "auto"
                          else opt.device)
    print(f"# benchmark: device {device}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
          f"env {opt.env}{' --text-view' if opt.text_view else ''}, "
          f"{'--quick' if opt.quick else 'full'} settings")
    start, cpu = time.perf_counter(), time.process_time()
    env = afsft.make_env(method_args("afsft", device, env=opt.env, text_view=opt.text_view))
    dataset = collect(env, opt.episodes)
    buffer = afsft.Buffer(dataset["episodes"])
    batch = buffer.sample(np.random.default_rng(0), afsft.Args.batch_turns, afsft.Args.run_length)
    root = tempfile.mkdtemp(prefix="afsft-bench-")
    try:
        paths = build_models(root, sizes, env, dataset, opt.vocab)
        save_batch(batch, os.path.join(root, "batch.pt"))
        update_cost({s: paths[s] for s in sizes}, batch, os.path.join(root, "batch.pt"), device, opt)
        rollout_throughput(paths["tiny"], device, opt)
        scaling(paths["tiny"], buffer, device, opt)
        if opt.profile:
            profile(paths["tiny"], batch, device, opt)
    finally:
        env.close()
        shutil.rmtree(root, ignore_errors=True)
    print(f"\ntotal {time.perf_counter() - start:.0f} s wall, {time.process_time() - cpu:.0f} s CPU "
          "(this process; the memory workers not counted)")


if __name__ == "__main__":
    main()
