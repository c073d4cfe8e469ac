"""The networks and their tables of transferable layers.

Every architecture declares its ordered table of transferable layers; "copy n layers" means its
first n entries, never the first n modules. CaffeNet is the paper's 8-layer net (conv1..fc8);
ResNet-18 (stem, eight residual blocks, fc) proves the table, not CaffeNet, is the abstraction.
`layer_names(arch)` gives a table's names without building the net (the sweep's n range).

    model = build_model("caffenet", num_classes=500)            # the paper's net at 227 px
    model = build_model("caffenet", num_classes=20, width=0.125, resolution=32)   # demo scale
    for layer in model.layer_table(): print(layer.name, layer.parameter_names())
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

ARCHITECTURES = ("caffenet", "resnet18")
NORMS = ("lrn", "batch")          # CaffeNet's normalisation: the paper's LRN, or batch norm (CPU demo recipes)


@dataclass(frozen=True)
class Layer:
    """One transferable unit: a name and the modules whose parameters and buffers it owns."""
    name: str
    modules: tuple[nn.Module, ...]
    prefixes: tuple[str, ...]          # state_dict prefixes of those modules, e.g. ("conv1.",)

    def parameters(self):
        for m in self.modules:
            yield from m.parameters()

    def parameter_names(self) -> list[str]:
        return [p + n for p, m in zip(self.prefixes, self.modules) for n, _ in m.named_parameters()]

    def state_keys(self, state_dict) -> list[str]:
        return [k for k in state_dict if k.startswith(self.prefixes)]


class TransferableNet(nn.Module):
    """Base of every architecture: a layer table, and frozen layers that stay in eval mode.

    `frozen_layers` holds the names of layers whose parameters are frozen; their batch-norm
    statistics are frozen too, so `train()` leaves those modules in eval mode.
    """
    frozen_layers: tuple[str, ...] = ()

    def layer_specs(self) -> list[tuple[str, tuple[str, ...]]]:
        raise NotImplementedError

    def layer_table(self) -> list[Layer]:
        table = []
        for name, prefixes in self.layer_specs():
            modules = tuple(self.get_submodule(p) for p in prefixes)
            table.append(Layer(name, modules, tuple(p + "." for p in prefixes)))
        return table

    def stages(self) -> list:
        """One callable per entry of the layer table, in order: the forward pass is them applied in turn. The
        first n are a transfer's frozen prefix (computed once per input: frozen_prefix.py), the rest its trained part."""
        raise NotImplementedError

    def deterministic_stages(self) -> int:
        """How many leading stages are fixed functions once their layers are frozen: none of them draws random
        numbers in training mode (a dropout does). A frozen prefix is looked up, or shared by a cohort's members,
        at most this deep (frozen_prefix.py)."""
        return len(self.layer_specs())

    def run_stages(self, x, start: int = 0, stop: int | None = None):
        for stage in self.stages()[start:stop]:
            x = stage(x)
        return x

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.frozen_layers:
            for layer in self.layer_table():
                if layer.name in self.frozen_layers:
                    for m in layer.modules:
                        m.eval()
        return self


class CrossChannelLRN(nn.Module):
    """Caffe/AlexNet local response norm across channels, as a banded 1x1 convolution of x^2.

    Same result as nn.LocalResponseNorm(size, alpha, beta, k) (k=1 is Caffe's convention) but
    about 2x faster on small CPU nets (measured in ../shared/notes/synthetic.md).
    """

    def __init__(self, channels: int, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0):
        super().__init__()
        idx = torch.arange(channels)
        lo, hi = size // 2, (size - 1) // 2          # nn.LocalResponseNorm's window: c-lo .. c+hi
        band = ((idx[None, :] >= idx[:, None] - lo) & (idx[None, :] <= idx[:, None] + hi)).float()
        self.register_buffer("band", band.view(channels, channels, 1, 1) * (alpha / size), persistent=False)
        self.beta, self.k = beta, k

    def forward(self, x):
        return x / (self.k + F.conv2d(x * x, self.band.to(x.dtype))).pow(self.beta)


class SeededDropout(nn.Dropout):
    """nn.Dropout drawing its masks from its own generator, seeded as the net is built (from the trial's init
    seed): a rerun of a trial draws the same masks, in any process, and a frozen prefix looked up once per input
    (frozen_prefix.py) leaves them as they were, and the nets of a cohort draw each their own, as alone. A trial
    resumed from a checkpoint starts the masks' stream afresh (its state is not part of the weights); a net under
    torch.compile draws torch's own dropout masks."""

    def __init__(self, p: float, seed: int):
        super().__init__(p)
        self.seed = int(seed)
        self._generators = {}

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        if self.p >= 1:
            return x * 0
        if torch.compiler.is_compiling():      # torch.compile (the fast recipe on CUDA) traces torch's own dropout
            return F.dropout(x, self.p, True)  # whole; its masks come from the global generator there
        generator = self._generators.get(x.device)
        if generator is None:                  # under DDP each rank its own masks (its own samples), rank 0 as alone
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            generator = self._generators[x.device] = torch.Generator(x.device).manual_seed(self.seed + 7919 * rank)
        keep = torch.empty_like(x).bernoulli_(1 - self.p, generator=generator)
        return x * keep / (1 - self.p)

    def __getstate__(self):                   # generators do not pickle (copy.deepcopy, a net sent to a worker)
        state = dict(super().__getstate__())
        state["_generators"] = {}
        return state

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, seed={self.seed}"


def _geometry(resolution: int, stem_stride: int = 1):
    """conv1 (kernel, stride, pad) and the pool size for a given input resolution."""
    if resolution >= 160:
        return (11, 4, 0), 3          # the paper's 227 px stem: 227 -> 55 -> 27 -> 13 -> 6
    return (5, stem_stride, 2), 3     # small images (28-64 px): 32 -> 32 -> 15 -> 7 -> 3; 28 -> 28 -> 13 -> 6 -> 2;
                                      # stride 2: 30 -> 15 -> 7 -> 3 -> 1


class CaffeNet(TransferableNet):
    """The paper's network (CaffeNet variant of AlexNet), pooling before LRN, groups of 2 in conv2/4/5.

    `width` scales every layer's channels (fc6/fc7 by `fc_width` if given); `resolution` picks the
    stem so the same 8 named layers run at 227 px (paper) or 32-64 px (demo on a CPU).
    """

    LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")

    def __init__(self, num_classes: int, width: float = 1.0, resolution: int = 227,
                 fc_width: float | None = None, init: str = "paper", dropout: float = 0.5, norm: str = "lrn",
                 stem_stride: int = 1):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; expected one of {', '.join(NORMS)}")
        self.norm = norm
        c = [max(2, 2 * round(w * width / 2)) for w in (96, 256, 384, 384, 256)]
        fc = max(8, round(4096 * (fc_width if fc_width is not None else width)))
        (k1, s1, p1), pool = _geometry(resolution, stem_stride)
        self.resolution = resolution
        self.conv1 = nn.Conv2d(3, c[0], k1, s1, p1)
        self.norm1 = CrossChannelLRN(c[0])
        self.conv2 = nn.Conv2d(c[0], c[1], 5, 1, 2, groups=2)
        self.norm2 = CrossChannelLRN(c[1])
        self.conv3 = nn.Conv2d(c[1], c[2], 3, 1, 1)
        self.conv4 = nn.Conv2d(c[2], c[3], 3, 1, 1, groups=2)
        self.conv5 = nn.Conv2d(c[3], c[4], 3, 1, 1, groups=2)
        self.pool = nn.MaxPool2d(pool, 2)
        side = resolution
        side = (side + 2 * p1 - k1) // s1 + 1
        for _ in range(3):
            side = (side - pool) // 2 + 1
        if side < 1:
            raise ValueError(f"CaffeNet at {resolution} px with conv1 stride {s1}: the three poolings leave no "
                             "pixel for fc6; use larger crops (stride 2 needs at least 30 px)")
        self.fc6 = nn.Linear(c[4] * side * side, fc)
        self.fc7 = nn.Linear(fc, fc)
        self.fc8 = nn.Linear(fc, num_classes)
        init_caffenet(self, init)
        # paper: 0.5; seeded after the weights (a net without dropout draws nothing more: its init is unchanged)
        seeds = torch.randint(0, 2 ** 62, (2,)).tolist() if dropout > 0 else (0, 0)
        self.drop6, self.drop7 = SeededDropout(dropout, seeds[0]), SeededDropout(dropout, seeds[1])
        if norm == "batch":            # one batch norm per layer but fc8, owned by that layer (frozen with it)
            for name in self.LAYERS[:-1]:
                features = getattr(self, name).weight.shape[0]
                self.add_module(f"{name}_bn", (nn.BatchNorm2d if name.startswith("conv") else nn.BatchNorm1d)(features))
            self.norm1 = self.norm2 = nn.Identity()

    def deterministic_stages(self) -> int:
        """Stage 7 (fc7) applies fc6's dropout to its input and stage 8 (fc8) fc7's: the stages before the first
        active dropout are fixed functions."""
        for index, drop in ((6, self.drop6), (7, self.drop7)):
            if drop.p > 0:
                return index
        return len(self.LAYERS)

    def layer_specs(self):
        if self.norm == "batch":
            return [(name, (name, f"{name}_bn")) for name in self.LAYERS[:-1]] + [("fc8", ("fc8",))]
        return [(name, (name,)) for name in self.LAYERS]

    def _layer(self, name, x):
        """conv or fc, then its batch norm where the net has one, then ReLU."""
        x = getattr(self, name)(x)
        return F.relu(getattr(self, f"{name}_bn")(x) if self.norm == "batch" else x)

    def stages(self):
        layer, pool = self._layer, self.pool
        return [lambda x: self.norm1(pool(layer("conv1", x))),      # paper: pool before LRN
                lambda x: self.norm2(pool(layer("conv2", x))),
                lambda x: layer("conv3", x),
                lambda x: layer("conv4", x),
                lambda x: pool(layer("conv5", x)).flatten(1),
                lambda x: layer("fc6", x),
                lambda x: layer("fc7", self.drop6(x)),             # dropout on fc6's output, on even when fc6 is
                lambda x: self.fc8(self.drop7(x))]                  # frozen (the paper); fc7's likewise

    def forward(self, x):
        return self.run_stages(x)


# paper: weights N(0, 0.01) (fc6/fc7 N(0, 0.005)); biases 1 in conv2, conv4, conv5, fc6, fc7, else 0
PAPER_INIT = {"conv1": (0.01, 0.0), "conv2": (0.01, 1.0), "conv3": (0.01, 0.0), "conv4": (0.01, 1.0),
              "conv5": (0.01, 1.0), "fc6": (0.005, 1.0), "fc7": (0.005, 1.0), "fc8": (0.01, 0.0)}


def init_caffenet(model: CaffeNet, init: str = "paper", layers=CaffeNet.LAYERS):
    """Initialise the named layers. 'paper' is Caffe's scheme; 'kaiming' suits narrow demo nets,
    whose small fan-in makes the paper's fixed std vanish (He normal, biases 0.1 where paper has 1).
    """
    if init not in ("paper", "kaiming"):
        raise ValueError(f"unknown init {init!r}; expected 'paper' or 'kaiming'")
    for name in layers:
        m = getattr(model, name)
        std, bias = PAPER_INIT[name]
        if init == "kaiming":
            fan_in = m.weight[0].numel()
            gain = 1.0 if name == "fc8" else math.sqrt(2.0)
            std, bias = gain / math.sqrt(fan_in), (0.1 if bias else 0.0)
        nn.init.normal_(m.weight, 0.0, std)
        nn.init.constant_(m.bias, bias)


class ResNet18(TransferableNet, torchvision.models.ResNet):
    """torchvision's ResNet-18 with a layer table: stem, then each residual block, then fc.

    `width` scales every stage's channels (64, 128, 256, 512 at 1.0; 8 .. 64 at the demo's 0.125),
    built by torchvision's own `_make_layer`. Below 64 px the stem is a 3x3 stride-1 conv without
    max-pool (the CIFAR convention).
    """

    LAYERS = ("stem",) + tuple(f"layer{i}.{j}" for i in range(1, 5) for j in range(2)) + ("fc",)

    def __init__(self, num_classes: int, width: float = 1.0, resolution: int = 224):
        block = torchvision.models.resnet.BasicBlock
        torchvision.models.ResNet.__init__(self, block, [2, 2, 2, 2], num_classes=num_classes)
        self.resolution = resolution
        if width != 1.0:
            if width <= 0:
                raise ValueError(f"resnet18 width {width} must be > 0")
            c = max(2, round(64 * width))
            self.inplanes = c                        # what torchvision's _make_layer chains from
            self.conv1 = nn.Conv2d(3, c, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(c)
            self.layer1 = self._make_layer(block, c, 2)
            self.layer2 = self._make_layer(block, 2 * c, 2, stride=2)
            self.layer3 = self._make_layer(block, 4 * c, 2, stride=2)
            self.layer4 = self._make_layer(block, 8 * c, 2, stride=2)
            self.fc = nn.Linear(8 * c, num_classes)
        if resolution < 64:
            self.conv1 = nn.Conv2d(3, self.bn1.num_features, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        for m in self.modules():                     # torchvision's init, for the modules replaced above
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def layer_specs(self):
        return [("stem", ("conv1", "bn1"))] + [(name, (name,)) for name in self.LAYERS[1:]]

    def stages(self):                                # torchvision's _forward_impl, a stage per layer of the table
        blocks = [self.get_submodule(name) for name in self.LAYERS[1:-1]]
        return ([lambda x: self.maxpool(self.relu(self.bn1(self.conv1(x))))] + blocks
                + [lambda x: self.fc(torch.flatten(self.avgpool(x), 1))])


LAYER_NAMES = {"caffenet": CaffeNet.LAYERS, "resnet18": ResNet18.LAYERS}


def layer_names(arch: str) -> tuple[str, ...]:
    """An architecture's transferable layers in order, without building it: n = 1 .. len - 1 can be copied."""
    if arch not in LAYER_NAMES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHITECTURES)}")
    return LAYER_NAMES[arch]


def build_model(arch: str, num_classes: int, width: float = 1.0, resolution: int | None = None,
                fc_width: float | None = None, init: str | None = None, dropout: float = 0.5,
                norm: str = "lrn", stem_stride: int = 1) -> TransferableNet:
    """The one constructor used by transfer surgery, the loop and the CLI."""
    if arch == "caffenet":
        return CaffeNet(num_classes, width=width, resolution=resolution or 227, fc_width=fc_width,
                        init=init or "paper", dropout=dropout, norm=norm, stem_stride=stem_stride)
    if arch == "resnet18":
        return ResNet18(num_classes, width=width, resolution=resolution or 224)
    raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHITECTURES)}")


def describe_layers(model: TransferableNet) -> str:
    """The table `raytransfer layers ARCH` prints: index, name, parameter names and shapes."""
    params = dict(model.named_parameters())
    lines = [f"{'#':>2}  {'layer':<10} {'parameters':<42} shape"]
    for i, layer in enumerate(model.layer_table(), 1):
        for j, pname in enumerate(layer.parameter_names()):
            shape = "x".join(str(s) for s in params[pname].shape)
            lines.append(f"{i if j == 0 else '':>2}  {layer.name if j == 0 else '':<10} {pname:<42} {shape}")
    total = sum(p.numel() for p in model.parameters())
    lines.append(f"{len(model.layer_table())} transferable layers, {total:,} parameters")
    return "\n".join(lines)
