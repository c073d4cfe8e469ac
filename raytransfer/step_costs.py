"""Measured training-step costs, the one copy the estimate and the benchmarks share.

The paper's K20 logs give seconds per iteration of CaffeNet by the number of frozen leading layers
(a frozen prefix skips its backward pass; ../shared/paper/README.md section 5); one H100 gives the
speed of a base step (DESIGN.md, "Speed facts": the paper's net compiled in bf16, batch 256).
Both are CaffeNet's: no other architecture has measured costs here.

    relative_cost(7)        # 0.367: a frozen n = 7 step costs that share of a base step
"""
from __future__ import annotations

# seconds per iteration on the paper's K20: all-trainable 1.77; frozen n = 1..7
K20_S_PER_ITER = {0: 1.77, 1: 1.48, 2: 1.19, 3: 1.01, 4: 0.83, 5: 0.69, 6: 0.66, 7: 0.65}
H100_BASE_IMG_PER_S = 23_900          # one H100, CaffeNet compiled bf16, batch 256
MEASURED_ARCH = "caffenet"            # the architecture these costs were measured on


def relative_cost(frozen_layers: int) -> float:
    """Step time of CaffeNet with `frozen_layers` frozen leading layers over an all-trainable step."""
    if frozen_layers not in K20_S_PER_ITER:
        raise ValueError(f"frozen_layers={frozen_layers!r}: must be one of {sorted(K20_S_PER_ITER)} "
                         "(0 for base, scratch and fine-tuned nets; n for frozen AnB/BnB/random-frozen)")
    return K20_S_PER_ITER[frozen_layers] / K20_S_PER_ITER[0]
