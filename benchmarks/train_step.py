"""Images/s of one training step: a base step vs steps with frozen prefixes n = 1..7.

Frozen layers get no backward pass below the cut and no optimizer update, so a frozen-n step must
cost less than a base step; the paper's K20 logs give n = 7 at 0.37 x a base step. On a GPU the
script also times the paper's net at 227 px, batch 256, on synthetic batches already on the device
(the speed of light): fp32 eager, bf16 + channels_last, + torch.compile; the frozen prefixes compiled
in bf16; and, with --data, our loop with real FFCV loading as a ratio to that speed of light.

    python benchmarks/train_step.py                             # CPU: the demo-scale net, 1 thread
    python benchmarks/train_step.py --data data/synthetic       # + our loop on the CPU, with loading
    python benchmarks/train_step.py --device cuda --data /mnt/betons/imagenet

Plain PyTorch (FFCV only for --data), no Ray. Prints a Markdown table to paste into RESULTS.md.
"""
from __future__ import annotations

import argparse
import itertools
import platform
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from raytransfer.loop import make_optimizer, train_one_epoch
from raytransfer.recipes import get_recipe
from raytransfer.step_costs import relative_cost
from raytransfer.transfer import build_trial_network


def build(recipe, n: int, num_classes: int, device, channels_last: bool, compile: bool):
    """A base net (n = 0) or one with layers 1..n frozen at their init (costs the same as copied ones)."""
    net = build_trial_network(recipe.arch, num_classes, None, n, "random_frozen" if n else "scratch", 0,
                              recipe.arch_kwargs())
    net = net.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return net, make_optimizer(net, recipe), torch.compile(net) if compile else net


def steps_per_s(model, optimizer, images, labels, bf16: bool, warmup: int, steps: int) -> float:
    """Full training steps (forward, backward, SGD) on one batch already on the device."""
    autocast = (lambda: torch.autocast(images.device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
    model.train()

    def step():
        with autocast():
            loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    sync(images.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(images.device)
    return steps / (time.perf_counter() - t0)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_configs(configs, recipe, device, batch, num_classes, warmup, steps, rounds):
    """Images/s of each (name, n, bf16, channels_last, compile): best of `rounds`, configs interleaved
    so that a slow spell on a shared machine hits all of them alike."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, recipe.crop_size, recipe.crop_size, generator=g).to(device)
    labels = torch.randint(num_classes, (batch,), generator=g).to(device)
    built, best = {}, {name: 0.0 for name, *_ in configs}
    for r in range(rounds):
        for name, n, bf16, cl, comp in configs:
            _, optimizer, model = built.get(name) or build(recipe, n, num_classes, device, cl, comp)
            if rounds > 1:                          # keep it (and its compiled graph) for the next round
                built[name] = (_, optimizer, model)
            x = images.contiguous(memory_format=torch.channels_last) if cl else images
            rate = steps_per_s(model, optimizer, x, labels, bf16, warmup if r == 0 else 1, steps) * batch
            best[name] = max(best[name], rate)
    return best


def loop_images_per_s(recipe, data_dir, device, warmup: int, steps: int, num_threads: int) -> float:
    """Our loop (train_one_epoch) over a half of a prepared dataset, FFCV loading included."""
    from raytransfer.loaders import CropSpec, build_half_loaders
    from raytransfer.prepare import read_manifest

    classes = [c["id"] for c in read_manifest(data_dir)["classes"]]
    half = classes[: max(2, len(classes) // 2)]
    loaders = build_half_loaders(data_dir, half, CropSpec(recipe.crop, recipe.crop_size), recipe.batch_size,
                                 device, seed=0, num_workers=num_threads)
    net, optimizer, model = build(recipe, 0, len(half), device, recipe.channels_last,
                                  recipe.compile and device.type == "cuda")
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if recipe.bf16 and device.type == "cuda"
                else nullcontext)
    if len(loaders.train) < warmup + steps:
        raise SystemExit(f"--data {data_dir}: its half has {len(loaders.train)} batches of {recipe.batch_size}, "
                         f"fewer than the {warmup + steps} to time; lower --loop-steps or use a larger dataset")
    batches = iter(loaders.train)
    try:
        total = warmup + steps
        _, step = train_one_epoch(model, optimizer, itertools.islice(batches, warmup), device, recipe, 0, total,
                                  autocast)
        sync(device)
        m, _ = train_one_epoch(model, optimizer, itertools.islice(batches, steps), device, recipe, step, total,
                               autocast)
    finally:
        batches.close()
    return m["images_per_s"]


def machine(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor() or "CPU")
    threads = f"{torch.get_num_threads()} thread(s) of {torch.multiprocessing.cpu_count()} cores"
    return f"{cpu} ({threads}), torch {torch.__version__}"


def table(rows, base_rate) -> str:
    out = ["| step | images/s | cost vs base step | paper K20 cost |", "|---|---:|---:|---:|"]
    for name, n, rate in rows:
        paper = f"{relative_cost(n):.2f}" if n else ("1.00" if "base" in name else "")
        out.append(f"| {name} | {rate:,.0f} | {base_rate / rate:.2f} | {paper} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu (the demo-scale net) or cuda (adds the paper's net)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch and the loader")
    p.add_argument("--batch", type=int, default=None, help="images per step (default: 64 on CPU, 256 on CUDA)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per round (default: 20 on CPU, 50 on CUDA)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    p.add_argument("--rounds", type=int, default=5, help="rounds over all configurations; the best is kept")
    p.add_argument("--paper", action="store_true", help="time the paper's 227 px net also on the CPU (slow)")
    p.add_argument("--data", default=None, help="a prepared dataset folder: also time our loop with real loading")
    p.add_argument("--loop-steps", type=int, default=None, help="timed loop steps (default: the timed --steps)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.set_num_threads(args.threads)
    batch = args.batch or (256 if cuda else 64)
    steps = args.steps or (50 if cuda else 20)
    print(f"# {machine(device)}; batch {batch}; best of {args.rounds} rounds of {steps} steps\n")

    if not cuda:                                    # the demo-scale net: the same 8 named layers at 1/8 width
        demo = get_recipe("demo", batch_size=batch)
        cl = demo.channels_last
        configs = [("base", 0, False, cl, False)] + [(f"frozen n={n}", n, False, cl, False) for n in range(1, 8)]
        rates = time_configs(configs, demo, device, batch, 16, args.warmup, steps, args.rounds)
        print(f"## demo-scale CaffeNet (width 1/8, {demo.crop_size} px, 16-way head), fp32 eager"
              f"{', channels_last' if cl else ''}\n")
        print(table([(name, n, rates[name]) for name, n, *_ in configs], rates["base"]) + "\n")
        if args.data:
            rate = loop_images_per_s(demo, args.data, device, args.warmup, args.loop_steps or steps, args.threads)
            print(f"our loop with FFCV loading ({args.data}): {rate:,.0f} images/s = "
                  f"{rate / rates['base']:.2f} x the base step on data in memory\n")
    if cuda or args.paper:                          # the paper's net, 500-way head (a half of ImageNet)
        paper = get_recipe("fast", batch_size=batch)
        bf16 = cuda or args.paper
        configs = [("fp32 eager", 0, False, False, False), ("bf16 + channels_last", 0, bf16, True, False),
                   ("+ torch.compile (base)", 0, bf16, True, True)]
        configs += [(f"frozen n={n}, compiled bf16", n, bf16, True, True) for n in range(1, 8)]
        rates = time_configs(configs, paper, device, batch, 500, args.warmup, steps, args.rounds)
        light = rates["+ torch.compile (base)"]
        print(f"## the paper's CaffeNet at {paper.crop_size} px, 500-way head, synthetic data on the device\n")
        print(table([(name, n, rates[name]) for name, n, *_ in configs], light) + "\n")
        if args.data:
            rate = loop_images_per_s(paper, args.data, device, args.warmup, args.loop_steps or steps, args.threads)
            print(f"our loop with FFCV loading ({args.data}, {paper.crop} crop): {rate:,.0f} images/s = "
                  f"{rate / light:.2f} x the speed of light (compiled bf16 on data already on the device)\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
