"""The networks: the paper's CaffeNet at 227 px and at demo scale, ResNet-18, and their layer tables."""
import pytest
import torch
import torch.nn as nn

from raytransfer.cli import main as cli_main
from raytransfer.recipes import get_recipe
from raytransfer.models import CaffeNet, CrossChannelLRN, ResNet18, build_model, describe_layers, layer_names

CAFFENET_LAYERS = ["conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"]
RESNET_LAYERS = ["stem"] + [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)] + ["fc"]

# the paper's net with a 500-way head (a half of ImageNet): (out, in/groups, kh, kw) and (out, in)
PAPER_SHAPES = {"conv1": (96, 3, 11, 11), "conv2": (256, 48, 5, 5), "conv3": (384, 256, 3, 3),
                "conv4": (384, 192, 3, 3), "conv5": (256, 192, 3, 3), "fc6": (4096, 256 * 6 * 6),
                "fc7": (4096, 4096), "fc8": (500, 4096)}


@pytest.fixture(scope="module")
def paper_net():
    torch.manual_seed(0)
    return build_model("caffenet", 500)


def test_caffenet_table_is_the_papers_eight_layers(paper_net):
    table = paper_net.layer_table()
    assert [layer.name for layer in table] == CAFFENET_LAYERS
    params = dict(paper_net.named_parameters())
    for layer in table:
        assert layer.parameter_names() == [f"{layer.name}.weight", f"{layer.name}.bias"]
        assert tuple(params[f"{layer.name}.weight"].shape) == PAPER_SHAPES[layer.name]
    assert sum(p.numel() for p in paper_net.parameters()) == 58_916_724     # AlexNet/CaffeNet at 500 classes


def test_caffenet_paper_structure(paper_net):
    assert [getattr(paper_net, f"conv{i}").groups for i in range(1, 6)] == [1, 2, 1, 2, 2]
    assert paper_net.drop6.p == paper_net.drop7.p == 0.5
    order = []
    for name in ("conv1", "pool", "norm1", "conv2", "norm2"):
        getattr(paper_net, name).register_forward_hook(lambda *_, name=name: order.append(name))
    paper_net.eval()
    with torch.no_grad():
        out = paper_net(torch.randn(1, 3, 227, 227))
    assert out.shape == (1, 500)
    assert order[:6] == ["conv1", "pool", "norm1", "conv2", "pool", "norm2"]    # pooling before LRN


def test_caffenet_paper_init(paper_net):
    """N(0, 0.01), fc6/fc7 N(0, 0.005); biases 1 in conv2/4/5 and fc6/fc7, else 0 (Caffe's CaffeNet)."""
    stds = {"conv1": 0.01, "conv2": 0.01, "conv3": 0.01, "conv4": 0.01, "conv5": 0.01, "fc6": 0.005,
            "fc7": 0.005, "fc8": 0.01}
    ones = {"conv2", "conv4", "conv5", "fc6", "fc7"}
    for name, std in stds.items():
        m = getattr(paper_net, name)
        assert m.weight.std().item() == pytest.approx(std, rel=0.03), name
        assert abs(m.weight.mean().item()) < 0.1 * std, name
        assert torch.equal(m.bias, torch.full_like(m.bias, 1.0 if name in ones else 0.0)), name


def test_lrn_matches_torch_local_response_norm():
    x = torch.randn(2, 12, 7, 7) * 3
    ours = CrossChannelLRN(12)(x)
    ref = nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)(x)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    big = torch.rand(1, 12, 3, 3) * 300          # large activations: the normaliser matters
    torch.testing.assert_close(CrossChannelLRN(12)(big), nn.LocalResponseNorm(5, 1e-4, 0.75, 1.0)(big))


@pytest.mark.parametrize("resolution", [32, 64])
def test_caffenet_demo_scale_keeps_the_eight_layers(resolution):
    net = build_model("caffenet", 20, width=0.125, resolution=resolution, fc_width=0.0625, init="kaiming")
    assert [layer.name for layer in net.layer_table()] == CAFFENET_LAYERS
    assert net.conv2.out_channels == 32 and net.fc6.out_features == 256
    assert all(getattr(net, f"conv{i}").out_channels % 2 == 0 for i in range(1, 6))   # groups of 2 still divide
    net.eval()
    assert net(torch.randn(3, 3, resolution, resolution)).shape == (3, 20)


def test_caffenet_rejects_unknown_init():
    with pytest.raises(ValueError, match="'paper' or 'kaiming'"):
        CaffeNet(10, width=0.125, resolution=32, init="xavier")


def test_resnet18_table_stem_blocks_fc():
    net = build_model("resnet18", 10, resolution=32)
    table = net.layer_table()
    assert [layer.name for layer in table] == RESNET_LAYERS
    assert table[0].parameter_names() == ["conv1.weight", "bn1.weight", "bn1.bias"]
    assert "layer2.0.downsample.1.weight" in table[3].parameter_names()      # a block owns its shortcut
    assert any(isinstance(m, nn.BatchNorm2d) for m in table[1].modules[0].modules())
    assert net.conv1.kernel_size == (3, 3) and isinstance(net.maxpool, nn.Identity)   # small-image stem
    net.eval()
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert build_model("resnet18", 10).conv1.kernel_size == (7, 7)             # ImageNet stem at 224 px


@pytest.mark.parametrize("arch", ["caffenet", "resnet18"])
def test_every_parameter_belongs_to_exactly_one_layer(arch):
    net = build_model(arch, 10, width=0.125 if arch == "caffenet" else 1.0, resolution=32)
    names = [p for layer in net.layer_table() for p in layer.parameter_names()]
    assert len(names) == len(set(names))
    assert set(names) == {n for n, _ in net.named_parameters()}
    buffers = {k for k in net.state_dict() if not k.endswith(("weight", "bias"))}
    owned = {k for layer in net.layer_table() for k in layer.state_keys(net.state_dict())}
    assert buffers <= owned                                                    # batch-norm statistics too


def test_build_model_errors_name_the_choices():
    with pytest.raises(ValueError, match="caffenet, resnet18"):
        build_model("vgg16", 10)
    with pytest.raises(ValueError, match="width 0 must be > 0"):
        ResNet18(10, width=0)
    with pytest.raises(ValueError, match="caffenet, resnet18"):
        layer_names("vgg16")


def test_resnet18_width_scales_torchvisions_blocks():
    """The demo/smoke recipes' 1/8 width reaches ResNet-18: every stage 8x narrower, the same table."""
    net = ResNet18(10, width=0.125, resolution=28)
    assert [layer.name for layer in net.layer_table()] == RESNET_LAYERS == list(layer_names("resnet18"))
    assert (net.conv1.out_channels, net.layer1[0].conv2.out_channels, net.layer4[1].conv2.out_channels) == (8, 8, 64)
    assert net.fc.in_features == 64 and net(torch.zeros(2, 3, 28, 28)).shape == (2, 10)
    assert sum(p.numel() for p in net.parameters()) < sum(p.numel() for p in ResNet18(10, resolution=28).parameters()) / 50


def test_layers_command_prints_the_table(capsys):
    assert cli_main(["layers", "caffenet"]) == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    numbered = [line.split() for line in lines[1:-1] if line[:2].strip().isdigit()]
    assert [(int(row[0]), row[1]) for row in numbered] == list(enumerate(CAFFENET_LAYERS, 1))
    assert "conv2.weight" in out and "256x48x5x5" in out and "500x4096" in out
    assert lines[-1].startswith("8 transferable layers, 58,916,724 parameters")
    resnet_table = describe_layers(build_model("resnet18", 10, resolution=32))
    assert resnet_table.splitlines()[-1].startswith("10 transferable layers")


def test_layers_command_unknown_arch(capsys):
    assert cli_main(["layers", "alexnet"]) == 2
    assert "caffenet, resnet18" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", ["paper", "fast", "demo", "smoke"])
@pytest.mark.parametrize("arch", ["caffenet", "resnet18"])
def test_every_recipe_builds_either_architecture(recipe, arch):
    """--arch reaches every recipe: the recipe's net at its crop size, the table's n range 1 .. layers - 1."""
    from raytransfer.recipes import get_recipe
    from raytransfer.sweep.jobs import n_range

    r = get_recipe(recipe, arch=arch)
    net = build_model(r.arch, 5, **r.arch_kwargs())
    assert net(torch.zeros(2, 3, r.crop_size, r.crop_size)).shape == (2, 5)      # 2: batch norm in train mode
    assert list(n_range(arch)) == list(range(1, len(net.layer_table())))


def test_batch_norm_caffenet_layers_own_their_norms_and_frozen_ones_stay_put():
    """norm='batch' (the CPU recipes): each layer but fc8 owns its batch norm, so copying or freezing n layers
    copies or freezes their norms too, running statistics included."""
    from raytransfer.transfer import build_trial_network, frozen_state, verify_frozen

    kwargs = get_recipe("demo").arch_kwargs()
    base = build_trial_network("caffenet", 8, None, 0, "scratch", 0, kwargs)
    assert [layer.prefixes for layer in base.layer_table()][:2] == [("conv1.", "conv1_bn."), ("conv2.", "conv2_bn.")]
    assert base.layer_table()[-1].prefixes == ("fc8.",)
    net = build_trial_network("caffenet", 8, base.state_dict(), 3, "frozen", 1, kwargs)
    reference = {k: v.clone() for k, v in frozen_state(net).items()}
    assert "conv3_bn.running_mean" in reference and "conv4_bn.running_mean" not in reference
    optimizer = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    net.train()
    for _ in range(3):
        loss = net(torch.randn(16, 3, 30, 30)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert verify_frozen(net, reference)["ok"]
    assert not net.conv3_bn.training and net.conv4_bn.training
    assert not torch.equal(net.conv4_bn.running_mean, torch.zeros_like(net.conv4_bn.running_mean))


def test_a_stride_2_stem_keeps_the_eight_layers_at_a_quarter_of_the_first_maps():
    net = build_model("caffenet", 8, width=0.125, resolution=30, stem_stride=2)
    assert net(torch.randn(2, 3, 30, 30)).shape == (2, 8)
    assert net.conv1.stride == (2, 2) and list(layer_names("caffenet")) == [l.name for l in net.layer_table()]
    with pytest.raises(ValueError, match="stride 2 needs at least 30 px"):
        build_model("caffenet", 8, width=0.125, resolution=28, stem_stride=2)
