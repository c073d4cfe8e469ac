"""The paper's solver exactly: Caffe's SGD (v = m v + lr (g + wd w); w -= v) for the paper's recipes, checked on
a decay step against its closed form and against Caffe's rule applied by hand inside the loop (warm-up, biases
at lr x2 without decay, a resume between two steps); torch's SGD unchanged for every other recipe."""
import copy
from contextlib import nullcontext
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from raytransfer.loop import CaffeSGD, Meter, make_optimizer, train_steps
from raytransfer.models import build_model
from raytransfer.recipes import KEY_NEUTRAL_DEFAULTS, get_recipe

CPU = torch.device("cpu")
W0, G = [1.0, -2.0], [0.5, 1.0]            # a weight and its (constant) gradient: loss = G . w
MOMENTUM, DECAY, RATES = 0.9, 0.1, (0.1, 0.01)     # the second step after a x0.1 decay


def two_steps(optimizer_class) -> torch.Tensor:
    w = torch.tensor(W0, dtype=torch.float64, requires_grad=True)
    opt = optimizer_class([w], lr=RATES[0], momentum=MOMENTUM, weight_decay=DECAY)
    for lr in RATES:
        opt.param_groups[0]["lr"] = lr
        opt.zero_grad()
        (torch.tensor(G, dtype=torch.float64) * w).sum().backward()
        opt.step()
    return w.detach()


def test_caffe_solver_applies_the_rate_before_the_momentum_across_a_decay():
    # Caffe: v1 = 0.1 (G + 0.1 W0) = (0.06, 0.08); w1 = (0.94, -2.08)
    #        v2 = 0.9 v1 + 0.01 (G + 0.1 w1) = (0.054 + 0.00594, 0.072 + 0.00792); w2 = w1 - v2
    assert two_steps(CaffeSGD).tolist() == pytest.approx([0.94 - 0.05994, -2.08 - 0.07992], abs=1e-12)
    # torch: b1 = G + 0.1 W0 = (0.6, 0.8); w1 = W0 - 0.1 b1, the same (0.94, -2.08); b2 = 0.9 b1 + (0.594, 0.792)
    #        = (1.134, 1.512); w2 = w1 - 0.01 b2: the old momentum taken at the new rate, a smaller step
    assert two_steps(torch.optim.SGD).tolist() == pytest.approx([0.94 - 0.01134, -2.08 - 0.01512], abs=1e-12)


def test_the_paper_recipes_use_caffes_solver_and_the_others_keep_torchs():
    assert get_recipe("paper").solver == get_recipe("paper_reduced").solver == "caffe"
    assert {get_recipe(n).solver for n in ("fast", "demo", "smoke")} == {"torch"}
    assert KEY_NEUTRAL_DEFAULTS["solver"] == "torch"               # their job keys stay
    assert "solver" not in get_recipe("demo").identity() and get_recipe("paper").identity()["solver"] == "caffe"
    net = build_model("caffenet", 4, width=0.125, fc_width=0.0625, resolution=28, dropout=0.0)
    assert type(make_optimizer(net, get_recipe("paper"))) is CaffeSGD
    assert type(make_optimizer(net, get_recipe("demo"))) is torch.optim.SGD
    with pytest.raises(ValueError, match="solver 'adam'; expected one of torch, caffe"):
        get_recipe("paper", solver="adam")


# 6 steps: the warm-up's first third (lr 0, then lr / 2), the full rate, then x0.1 from step 3 on
LOOP_RECIPE = get_recipe("paper", width=0.125, fc_width=0.0625, crop_size=28, resize_size=32, dropout=0.0,
                         batch_size=4, lr=0.05, iterations=6, warmup_fraction=1 / 3, milestones=(0.5,))


def batches(count=6):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 3, 28, 28, generator=g), torch.randint(0, 4, (4,), generator=g)) for _ in range(count)]


def caffe_by_hand(net, recipe, data) -> dict:
    """Caffe's update written out per parameter: local rate lr x lr_mult (biases 2), decay on weights only."""
    history = {name: torch.zeros_like(p) for name, p in net.named_parameters()}
    for step, (x, y) in enumerate(data):
        lr = recipe.lr_at(step, recipe.iterations)
        net.zero_grad()
        F.cross_entropy(net(x), y).backward()
        with torch.no_grad():
            for name, p in net.named_parameters():
                bias = p.ndim == 1
                rate, decay = lr * (recipe.bias_lr_mult if bias else 1.0), 0.0 if bias else recipe.weight_decay
                history[name] = recipe.momentum * history[name] + rate * (p.grad + decay * p)
                p -= history[name]
    return {k: v.detach() for k, v in net.state_dict().items()}


def through_the_loop(net, recipe, data, resume_at=None) -> dict:
    optimizer, meter = make_optimizer(net, recipe), Meter(CPU)
    step = 0
    if resume_at is not None:                      # a checkpoint between two steps, into a fresh optimizer
        step = train_steps(net, optimizer, iter(data), recipe, 0, resume_at, recipe.iterations, nullcontext, meter)
        saved = copy.deepcopy(optimizer.state_dict())
        optimizer = make_optimizer(net, recipe)
        optimizer.load_state_dict(saved)
    train_steps(net, optimizer, iter(data[step:]), recipe, step, recipe.iterations, recipe.iterations, nullcontext,
                meter)
    return {k: v.detach() for k, v in net.state_dict().items()}


def test_the_loop_steps_by_caffes_rule_through_warm_up_decay_and_a_resume(one_thread):
    assert [LOOP_RECIPE.lr_at(s, 6) for s in range(6)] == pytest.approx([0, 0.025, 0.05, 0.005, 0.005, 0.005])
    torch.manual_seed(0)
    start = build_model("caffenet", 4, **LOOP_RECIPE.arch_kwargs())
    data = batches()
    expected = caffe_by_hand(copy.deepcopy(start), LOOP_RECIPE, data)
    for resume_at in (None, 3):                    # straight through; resumed right at the decay
        got = through_the_loop(copy.deepcopy(start), LOOP_RECIPE, data, resume_at)
        for k, v in expected.items():
            torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-7, msg=k)
    # torch's rule on the same steps: another net after the rate's changes, the same one at a constant rate
    torched = through_the_loop(copy.deepcopy(start), replace(LOOP_RECIPE, solver="torch"), data)
    w0 = start.state_dict()["conv1.weight"]
    caffe_moved, torch_moved = expected["conv1.weight"] - w0, torched["conv1.weight"] - w0
    assert (torch_moved - caffe_moved).norm() > 0.1 * caffe_moved.norm()
    constant = replace(LOOP_RECIPE, warmup_fraction=0.0, milestones=())
    caffe, torch_sgd = (through_the_loop(copy.deepcopy(start), replace(constant, solver=s), data)
                        for s in ("caffe", "torch"))
    for k, v in caffe.items():
        torch.testing.assert_close(torch_sgd[k], v, rtol=1e-4, atol=1e-6, msg=k)
