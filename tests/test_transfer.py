"""Layer surgery per mode: what is copied, what is frozen, and that frozen stays frozen under real steps."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from raytransfer.loop import make_optimizer
from raytransfer.recipes import get_recipe
from raytransfer.transfer import (FROZEN_MODES, MODES, build_trial_network, check_mode, frozen_state,
                                  init_seed_for, verify_frozen)

CAFFENET = {"width": 0.125, "fc_width": 0.0625, "resolution": 32, "init": "kaiming", "dropout": 0.0}
RESNET = {"resolution": 32}
PAPER = get_recipe("paper")          # momentum 0.9, weight decay 5e-4, biases lr x2 without decay
SEED, BASE_SEED = 7, 123


def base_state(arch, kwargs):
    """A 'trained' base: another seed, batch-norm statistics moved off their defaults."""
    net = build_trial_network(arch, 10, None, 0, "scratch", BASE_SEED, kwargs)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    for k in state:
        if k.endswith("running_mean"):
            state[k] -= 0.2
        elif k.endswith("running_var"):
            state[k] += 0.5
        elif k.endswith("num_batches_tracked"):
            state[k] += 11
    return state


def layer_tensors(net, layer):
    sd = net.state_dict()
    return {k: sd[k] for k in layer.state_keys(sd)}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def differs(a: dict, b: dict) -> bool:
    """Every weight matrix or kernel differs (constant biases and BN weights are equal in any init)."""
    weights = [k for k in a if a[k].ndim >= 2]
    return bool(weights) and all(not torch.equal(a[k], b[k]) for k in weights)


@pytest.fixture(scope="module")
def bases():
    return {"caffenet": base_state("caffenet", CAFFENET), "resnet18": base_state("resnet18", RESNET)}


@pytest.mark.parametrize("arch,kwargs,n", [("caffenet", CAFFENET, 1), ("caffenet", CAFFENET, 5),
                                           ("caffenet", CAFFENET, 7), ("resnet18", RESNET, 2),
                                           ("resnet18", RESNET, 9)])
@pytest.mark.parametrize("mode", MODES)
def test_each_mode_copies_and_freezes_its_prefix(bases, arch, kwargs, n, mode):
    n = 0 if mode == "scratch" else n
    base = bases[arch]
    net = build_trial_network(arch, 10, base if mode in ("frozen", "finetune") else None, n, mode, SEED, kwargs)
    scratch = build_trial_network(arch, 10, None, 0, "scratch", SEED, kwargs)
    base_net = build_trial_network(arch, 10, None, 0, "scratch", BASE_SEED, kwargs)
    base_net.load_state_dict(base)
    for i, (layer, fresh, src) in enumerate(zip(net.layer_table(), scratch.layer_table(), base_net.layer_table())):
        mine = layer_tensors(net, layer)
        copied = i < n and mode in ("frozen", "finetune")
        if copied:
            assert same(mine, layer_tensors(base_net, src)), (mode, layer.name)
        else:                          # random_frozen prefix and every layer above n: scratch's fresh init
            assert same(mine, layer_tensors(scratch, fresh)), (mode, layer.name)
            assert differs(mine, layer_tensors(base_net, src)), (mode, layer.name)
        frozen = i < n and mode in FROZEN_MODES
        assert all(p.requires_grad != frozen for p in layer.parameters()), (mode, layer.name)
    prefix = {layer.name for layer in net.layer_table()[:n]}
    assert set(net.frozen_layers) == (prefix if mode in FROZEN_MODES else set())


def test_copy_means_table_entries_not_modules(bases):
    """ResNet n=2 is the stem (conv1 + bn1) and the whole first block, not the first two modules."""
    net = build_trial_network("resnet18", 10, bases["resnet18"], 2, "frozen", SEED, RESNET)
    sd = net.state_dict()
    for k in ("conv1.weight", "bn1.running_mean", "layer1.0.conv2.weight", "layer1.0.bn2.running_var"):
        assert torch.equal(sd[k], bases["resnet18"][k]), k
    assert not torch.equal(sd["layer1.1.conv1.weight"], bases["resnet18"]["layer1.1.conv1.weight"])
    assert sd["bn1.num_batches_tracked"].item() == 11


def seeded_batches(steps, side, classes=10, batch=8):
    """Random images; ResNet-18 gets 8 px ones (its pooling takes any size) to keep the test fast."""
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, 3, side, side, generator=g), torch.randint(classes, (batch,), generator=g))
            for _ in range(steps)]


def optimizer_params(optimizer):
    return [p for group in optimizer.param_groups for p in group["params"]]


@pytest.mark.parametrize("arch,kwargs,n", [("caffenet", CAFFENET, 3), ("resnet18", RESNET, 4)])
@pytest.mark.parametrize("mode", FROZEN_MODES)
def test_frozen_layers_survive_real_optimizer_steps(bases, arch, kwargs, n, mode):
    base = bases[arch] if mode == "frozen" else None
    net = build_trial_network(arch, 10, base, n, mode, SEED, kwargs)
    fresh = build_trial_network(arch, 10, None, 0, "scratch", SEED, kwargs).state_dict()
    reference = {k: (base if mode == "frozen" else fresh)[k].clone() for k in frozen_state(net)}
    assert len(reference) == (2 * n if arch == "caffenet" else 6 + 12 + 12 + 18)     # BN statistics included
    trainable_before = {k: v.clone() for k, v in net.state_dict().items() if k not in reference}
    optimizer = make_optimizer(net, get_recipe("paper", lr=0.05))
    in_optimizer = {id(p) for p in optimizer_params(optimizer)}
    frozen_params = [p for layer in net.layer_table()[:n] for p in layer.parameters()]
    assert frozen_params and not any(id(p) in in_optimizer for p in frozen_params)     # no momentum, no decay
    assert in_optimizer == {id(p) for p in net.parameters() if p.requires_grad}
    net.train()
    for images, labels in seeded_batches(3, 32 if arch == "caffenet" else 8):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(net(images), labels).backward()
        optimizer.step()
    check = verify_frozen(net, reference)
    assert check == {"ok": True, "checked": len(reference), "mismatched": []}
    after = net.state_dict()
    changed = [k for k, v in trainable_before.items() if v.is_floating_point() and not torch.equal(after[k], v)]
    assert len(changed) > len(trainable_before) // 2             # the steps were real: the rest trained
    # and the check can fail: one frozen value nudged is reported by name
    key = next(k for k in reference if k.endswith("weight"))
    with torch.no_grad():
        net.state_dict()[key].view(-1)[0] += 1e-6
    bad = verify_frozen(net, reference)
    assert bad["ok"] is False and bad["mismatched"] == [key]


def test_frozen_resnet_batchnorm_statistics_stay_put(bases):
    net = build_trial_network("resnet18", 10, bases["resnet18"], 2, "frozen", SEED, RESNET)
    wrapper = nn.Sequential(net)           # DDP / torch.compile wrap the net: train() reaches it through them
    before = {k: v.clone() for k, v in net.state_dict().items() if "running" in k or "num_batches" in k}
    for mode in (True, False, True):
        wrapper.train(mode)
    assert not net.bn1.training and not net.layer1[0].bn1.training
    assert net.layer1[1].bn1.training and net.fc.training
    with torch.no_grad():
        for images, _ in seeded_batches(2, 8):
            net(images * 3 + 1)
    after = net.state_dict()
    frozen_keys = [k for k in before if k.startswith(("bn1.", "layer1.0."))]
    assert frozen_keys and all(torch.equal(after[k], before[k]) for k in frozen_keys)
    assert not torch.equal(after["layer1.1.bn1.running_mean"], before["layer1.1.bn1.running_mean"])
    assert after["layer1.1.bn1.num_batches_tracked"].item() == 2


def test_finetune_trains_copied_layers_at_full_rate_by_default(bases):
    net = build_trial_network("caffenet", 10, bases["caffenet"], 3, "finetune", SEED, CAFFENET)
    copied = ["conv1", "conv2", "conv3"]
    groups = make_optimizer(net, PAPER, copied_layers=copied).param_groups
    assert sum(len(g["params"]) for g in groups) == 16                      # all 8 layers, weight + bias
    assert sorted((g["lr_mult"], g["weight_decay"]) for g in groups) == [(1.0, 5e-4), (2.0, 0.0)]
    slow = make_optimizer(net, get_recipe("paper", copied_lr_mult=0.1), copied_layers=copied).param_groups
    by_mult = {round(g["lr_mult"], 6): len(g["params"]) for g in slow}
    assert by_mult == {1.0: 5, 2.0: 5, 0.1: 3, 0.2: 3}
    assert {g["lr"] for g in slow} == {PAPER.lr * g["lr_mult"] for g in slow}


def test_optimizer_covers_every_trainable_parameter():
    for arch, kwargs in (("caffenet", CAFFENET), ("resnet18", RESNET)):
        net = build_trial_network(arch, 10, None, 0, "scratch", SEED, kwargs)
        params = optimizer_params(make_optimizer(net, PAPER))
        assert len(params) == len({id(p) for p in params}) == len(list(net.parameters()))


def test_numpy_base_weights_copy_and_verify(bases):
    """Base weights from the object store arrive as read-only numpy arrays."""
    numpy_base = {k: v.numpy().copy() for k, v in bases["caffenet"].items()}
    for v in numpy_base.values():
        v.flags.writeable = False
    net = build_trial_network("caffenet", 10, numpy_base, 2, "frozen", SEED, CAFFENET)
    assert verify_frozen(net, {k: numpy_base[k] for k in frozen_state(net)})["ok"]


@pytest.mark.parametrize("mode,n,base,match", [
    ("frozen_all", 1, True, "expected one of frozen, finetune"),
    ("scratch", 2, False, "n must be 0"),
    ("frozen", 8, True, r"outside 1\.\.7"),
    ("finetune", 0, True, r"outside 1\.\.7"),
    ("frozen", 3, False, "give base weights"),
])
def test_impossible_combinations_are_refused(mode, n, base, match):
    with pytest.raises(ValueError, match=match):
        check_mode(mode, n, 8, base)


def test_base_of_another_width_is_refused(bases):
    with pytest.raises(ValueError, match="different width or resolution"):
        build_trial_network("caffenet", 10, bases["caffenet"], 2, "frozen", SEED, {**CAFFENET, "width": 0.25})


def test_init_seeds_are_stable_and_streams_differ():
    assert init_seed_for(3) == init_seed_for(3, "fresh") != init_seed_for(3, "base")
    assert init_seed_for(3) != init_seed_for(4)
    assert 0 <= init_seed_for(3) < 2**31


def test_parameters_outside_the_table_are_refused():
    net = build_trial_network("caffenet", 10, None, 0, "scratch", SEED, CAFFENET)
    net.extra = nn.Linear(2, 2)            # would never be trained: make_optimizer builds groups from the table
    with pytest.raises(ValueError, match=r"\['extra.weight', 'extra.bias'\] belong to no layer"):
        make_optimizer(net, PAPER)


@pytest.mark.parametrize("arch,kwargs,n,bn", [("caffenet", {**CAFFENET, "norm": "batch"}, 3, "conv3_bn"),
                                             ("resnet18", RESNET, 2, "layer1.0.bn2")])
def test_the_frozen_check_covers_batch_norm_statistics_and_affine_parameters(arch, kwargs, n, bn):
    """Frozen means frozen for batch norm too: the prefix's BN layers stay in eval mode through real training
    steps, their affine parameters and running statistics are part of the frozen check, and a moved statistic
    fails it by name."""
    net = build_trial_network(arch, 10, None, n, "random_frozen", SEED, kwargs)
    reference = frozen_state(net)
    assert {f"{bn}.{k}" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")} <= set(reference)
    optimizer = make_optimizer(net, get_recipe("paper", lr=0.05))
    net.train()
    frozen_bn = [m for layer in net.layer_table()[:n] for m in layer.modules for m in m.modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert frozen_bn and not any(m.training for m in frozen_bn)
    for images, labels in seeded_batches(3, 32 if arch == "caffenet" else 8):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(net(images * 2 + 0.5), labels).backward()     # off-centre inputs: BN in train mode would move
        optimizer.step()
    assert verify_frozen(net, reference) == {"ok": True, "checked": len(reference), "mismatched": []}
    with torch.no_grad():
        net.state_dict()[f"{bn}.running_mean"][0] += 0.1
    assert verify_frozen(net, reference)["mismatched"] == [f"{bn}.running_mean"]
