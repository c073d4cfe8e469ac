"""Measured training-step costs, the one copy the estimate, the console's ETA and the benchmarks share.

Step speeds of the paper's CaffeNet (full width, 227 px crops, 500-way head, data already on the GPU) by
precision, compile and batch, each with the run it comes from:
- DESIGN.md, "Speed facts" (one H100, one run each): fp32 eager 12.6k img/s, bf16 + channels_last 15.9k,
  + torch.compile 23.9k at batch 256, 27.0k at batch 1024;
- benchmarks/RESULTS.md, "Train step and input on one H200" (`python benchmarks/train_step.py --device cuda`):
  fp32 eager 12,599, bf16 + channels_last 19,120, + compile 23,164 at batch 256; frozen n = 1..7 compiled.
Frozen prefixes skip their backward pass: their cost relative to a base step is the paper's K20 logs (Caffe,
fp32: ../shared/paper/README.md section 5) for an fp32 recipe, the H200's compiled bf16 ratios for a
compiled bf16 one. No other architecture, width or crop has measured costs here: `step_speed` says None.

    relative_cost(7)                 # 0.367: a frozen n = 7 step of the paper's fp32 net, as a share of a base step
    relative_cost("AnB", 7)          # the same, by treatment: frozen AnB/BnB/random_frozen pay it; AnB+ costs 1
    step_speed(get_recipe("paper"))  # StepSpeed(12600, 'H100', ...): fp32 eager, batch 256
"""
from __future__ import annotations

from dataclasses import dataclass

MEASURED_ARCH = "caffenet"            # the architecture these costs were measured on
# seconds per iteration on the paper's K20: all-trainable 1.77; frozen n = 1..7
K20_S_PER_ITER = {0: 1.77, 1: 1.48, 2: 1.19, 3: 1.01, 4: 0.83, 5: 0.69, 6: 0.66, 7: 0.65}
# images/s of compiled bf16 steps on one H200 with n frozen layers (RESULTS.md, one run)
H200_COMPILED_BF16 = {0: 23_164, 1: 30_002, 2: 35_285, 3: 39_270, 4: 45_486, 5: 50_011, 6: 56_494, 7: 59_684}
H100_BASE_IMG_PER_S = 23_900          # one H100, CaffeNet compiled bf16, batch 256 (DESIGN.md)
FROZEN = ("AnB", "BnB", "random_frozen")   # treatments whose layers 1..n are frozen


@dataclass(frozen=True)
class StepSpeed:
    img_per_s: float          # a base step (all layers trainable)
    card: str                 # where it was measured
    source: str               # the document and run
    frozen: dict              # n -> relative cost of a frozen n step


# (bf16, channels_last, compile, batch) -> the base step's measured speed; H100 first (DESIGN.md's card),
# the H200's where the H100 has none
_K20_RATIOS = {n: s / K20_S_PER_ITER[0] for n, s in K20_S_PER_ITER.items()}
_H200_RATIOS = {n: H200_COMPILED_BF16[0] / v for n, v in H200_COMPILED_BF16.items()}
STEP_SPEEDS = {
    (False, False, False, 256): StepSpeed(12_600, "H100", "DESIGN.md Speed facts (fp32 eager; H200: 12,599)", _K20_RATIOS),
    (True, True, False, 256): StepSpeed(15_900, "H100", "DESIGN.md Speed facts (bf16 + channels_last; H200: 19,120)",
                                        _K20_RATIOS),
    (True, True, True, 256): StepSpeed(23_900, "H100", "DESIGN.md Speed facts (compiled bf16; H200: 23,164)",
                                       _H200_RATIOS),
    (True, True, True, 1024): StepSpeed(27_000, "H100", "DESIGN.md Speed facts (compiled bf16, batch 1024)",
                                        _H200_RATIOS),
}


def step_speed(recipe) -> StepSpeed | None:
    """The measured step of this recipe's own precision, compile and batch; None where nothing was measured
    (another architecture, width or crop size, or a precision/batch not in STEP_SPEEDS)."""
    if recipe.arch != MEASURED_ARCH or recipe.width != 1.0 or (recipe.fc_width or 1.0) != 1.0 \
            or recipe.crop_size != 227:
        return None
    return STEP_SPEEDS.get((recipe.bf16, recipe.channels_last, recipe.compile, recipe.batch_size))


def relative_cost(treatment, n: int | None = None, speed: StepSpeed | None = None) -> float:
    """A job's step time over a base step's. `relative_cost(treatment, n)`: frozen treatments (AnB, BnB,
    random_frozen) pay the frozen-n cost, every other (bases, scratch, fine-tuned, reduced) 1.0.
    `relative_cost(n)`: the cost of n frozen layers. The ratios are `speed.frozen` (default the K20's)."""
    if n is None:
        frozen_layers = treatment
    else:
        frozen_layers = int(n) if treatment in FROZEN else 0
    ratios = speed.frozen if speed is not None else _K20_RATIOS
    if frozen_layers not in ratios:
        raise ValueError(f"frozen_layers={frozen_layers!r}: must be one of {sorted(ratios)} "
                         "(0 for base, scratch and fine-tuned nets; n for frozen AnB/BnB/random-frozen)")
    return ratios[frozen_layers]


def forward_share(n: int, speed: StepSpeed | None = None) -> float:
    """The forward pass of layers 1..n as a share of a base step, from the measured frozen-n cost and one
    assumption no measurement here separates: a layer's backward pass costs twice its forward. Then a frozen-n
    step is F(1..n) + 3 F(n+1..) and a base step 3 F(all) = 1, so F(1..n) = (1 - frozen(n)) / 2."""
    return (1 - relative_cost(n, speed=speed)) / 2


def cohort_cost(trunks: dict, others: int, speed: StepSpeed | None = None) -> float:
    """One step of a cohort, in base steps: `others` nets that train every layer (1 each), and per shared frozen
    trunk ({trunk: [n of each frozen member]}) its forward pass once, to the deepest n, plus each frozen member's
    own part (its frozen-n cost less the forward of its frozen layers)."""
    cost = float(others)
    for ns in trunks.values():
        cost += forward_share(max(ns), speed) + sum(relative_cost(n, speed=speed) - forward_share(n, speed)
                                                    for n in ns)
    return cost
