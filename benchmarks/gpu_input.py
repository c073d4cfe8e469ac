"""Can the input keep up with a GPU step? Two GPU-side input paths against the compiled step's rate.

DESIGN.md: a CPU loader (FFCV, 16 cores) feeds a base step ~5x too slowly and a frozen n=7 step ~13x
too slowly. Two ways around it, timed here on the device alone (plain PyTorch, no FFCV, no Ray):

- raw pixels held in GPU memory (uint8, 256x256, as the paper stored them): the paper's exact train
  transform per sample -- random 227 crop, mirror, minus the cropped mean image, 0-255 scale -- as one
  gather on the GPU;
- JPEGs decoded on the GPU (nvJPEG through torchvision.io.decode_jpeg, batched), then the same crop.

Each rate is printed beside the training step it must feed (--step-rate, or the compiled bf16 base
step measured here), as a ratio: above 1 the input keeps up.

    python benchmarks/gpu_input.py --device cuda
    python benchmarks/gpu_input.py --device cpu --images 64 --batch 16 --steps 3     # a smoke run
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

STORED, CROP = 256, 227


def paper_crops(images, mean_image, idx, gen) -> torch.Tensor:
    """The paper's train transform for the samples `idx` of `images` (N, 256, 256, 3 uint8, on the
    device): a random 227 square per sample, mirrored half the time, minus the same square of the
    mean image (float, 0-255 scale, no std division). Returns float NCHW."""
    b, dev = len(idx), images.device
    oy = torch.randint(0, STORED - CROP + 1, (b,), device=dev, generator=gen)
    ox = torch.randint(0, STORED - CROP + 1, (b,), device=dev, generator=gen)
    flip = torch.rand(b, device=dev, generator=gen) < 0.5
    r = torch.arange(CROP, device=dev)
    ys = oy[:, None] + r
    xs = torch.where(flip[:, None], ox[:, None] + CROP - 1 - r, ox[:, None] + r)
    rows = idx[:, None, None]
    x = images[rows, ys[:, :, None], xs[:, None, :]].float()                 # (B, 227, 227, 3)
    x -= mean_image[ys[:, :, None], xs[:, None, :]]
    return x.permute(0, 3, 1, 2)                                              # NCHW view, channels_last memory


def time_it(fn, steps: int, warmup: int, device) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / steps


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_crop(device):
    """The gather equals the plain slicing it replaces (crop, mirror, mean subtraction)."""
    g = torch.Generator(device=device).manual_seed(1)
    images = torch.randint(0, 256, (3, STORED, STORED, 3), dtype=torch.uint8, device=device)
    mean = images.float().mean(0)
    idx = torch.tensor([2, 0, 1], device=device)
    got = paper_crops(images, mean, idx, g)
    g = torch.Generator(device=device).manual_seed(1)
    oy = torch.randint(0, STORED - CROP + 1, (3,), device=device, generator=g)
    ox = torch.randint(0, STORED - CROP + 1, (3,), device=device, generator=g)
    flip = torch.rand(3, device=device, generator=g) < 0.5
    for k in range(3):
        y, x = int(oy[k]), int(ox[k])
        want = (images[idx[k], y:y + CROP, x:x + CROP].float() - mean[y:y + CROP, x:x + CROP])
        if flip[k]:
            want = want.flip(1)
        assert torch.equal(got[k], want.permute(2, 0, 1)), "gather crop differs from slicing"


def base_step_rate(device, batch: int, steps: int) -> float:
    """Images/s of the compiled bf16 channels_last base step of the paper's net (500-way head)."""
    from raytransfer.loop import make_optimizer
    from raytransfer.recipes import get_recipe
    from raytransfer.transfer import build_trial_network

    recipe = get_recipe("fast", batch_size=batch)
    net = build_trial_network("caffenet", 500, None, 0, "scratch", 0, recipe.arch_kwargs()).to(
        device, memory_format=torch.channels_last)
    opt, model = make_optimizer(net, recipe), torch.compile(net)
    x = torch.randn(batch, 3, CROP, CROP, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(500, (batch,), device=device)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return batch / time_it(step, steps, 5, device)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--images", type=int, default=4096, help="images held on the device (uint8 256x256x3)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--jpegs", type=int, default=1024, help="JPEGs for the nvJPEG decode (encoded here first)")
    p.add_argument("--step-rate", type=float, help="images/s of the step to feed (default: measure the base step)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    check_crop(device)
    print(f"# {torch.cuda.get_device_name(device) if cuda else 'CPU'}, torch {torch.__version__}; batch {args.batch}\n")
    step_rate = args.step_rate or (base_step_rate(device, args.batch, args.steps) if cuda else None)

    g = torch.Generator(device=device).manual_seed(0)
    images = torch.randint(0, 256, (args.images, STORED, STORED, 3), dtype=torch.uint8, device=device, generator=g)
    mean = images[: min(512, args.images)].float().mean(0)

    def raw_batch():
        idx = torch.randint(0, args.images, (args.batch,), device=device, generator=g)
        return paper_crops(images, mean, idx, g).contiguous(memory_format=torch.channels_last)
    raw = args.batch / time_it(raw_batch, args.steps, 3, device)

    rows = [("raw uint8 in GPU memory, paper crop + mirror + mean image", raw)]
    if cuda:
        from torchvision.io import decode_jpeg, encode_jpeg
        cpu_imgs = images[: args.jpegs].permute(0, 3, 1, 2).cpu()
        # noise compresses badly; smooth it so the files are ~20-30 KB like ImageNet's 256 px JPEGs
        smooth = F.avg_pool2d(cpu_imgs.float(), 9, stride=1, padding=4).to(torch.uint8)
        jpegs = [encode_jpeg(im, quality=90) for im in smooth]
        kb = sum(len(j) for j in jpegs) / len(jpegs) / 1024

        def nvjpeg_batch():
            start = int(torch.randint(0, max(1, len(jpegs) - args.batch), (1,)))
            decoded = decode_jpeg(jpegs[start:start + args.batch], device=device)
            batch = torch.stack(decoded).permute(0, 2, 3, 1)                  # (B, 256, 256, 3) uint8
            idx = torch.arange(len(decoded), device=device)
            return paper_crops(batch, mean, idx, g).contiguous(memory_format=torch.channels_last)
        rows.append((f"nvJPEG decode ({kb:.0f} KB JPEGs) + the same crop", args.batch / time_it(nvjpeg_batch, args.steps // 2, 2, device)))

    print("| input path | images/s | x the step it feeds |")
    print("|---|---:|---:|")
    for name, rate in rows:
        ratio = f"{rate / step_rate:.2f}" if step_rate else "n/a"
        print(f"| {name} | {rate:,.0f} | {ratio} |")
    if step_rate:
        print(f"\nstep fed: {step_rate:,.0f} images/s (compiled bf16 base step of the paper's net, 227 px, batch {args.batch}"
              f"{'' if not args.step_rate else ', given'}); a frozen n=7 step needs ~{step_rate / 0.36:,.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
