"""LRP on torch.export programs (backend 'graph'): the eager network's maps, on the graph."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from _families import FAMILIES, build, images
from torch import nn
from torchvision.models.resnet import BasicBlock

from audit.bench import families as bench_families
from audit.engine.model import AttributionError
from audit.methods import COMPOSITES, explain
from audit.methods.lrp import lrp_rules
from audit.models import Normalized

FAST = ("resnet", "vgg", "mobilenet_v3", "efficientnet", "convnext", "vit")
TOL = 1e-4  # relative to the map's scale


def _relerr(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).abs().max() / ref.abs().max())


def _exported(model: nn.Module, x: torch.Tensor, dynamic: bool) -> torch.export.ExportedProgram:
    shapes = ({0: torch.export.Dim("batch", min=1, max=64)},) if dynamic else None
    return torch.export.export(model, (x,), dynamic_shapes=shapes)


def _check_family(name: str) -> None:
    _check(name, *build(name))


def _check(name: str, model: nn.Module, size: int) -> None:
    x = images(3, size)
    with torch.no_grad():
        live = (
            model(x)[:, 1] != 0
        )  # a logit of exactly 0 (SqueezeNet's final ReLU) has no relevance
    assert bool(live.any())
    ref = explain("lrp", model, x, 1)
    ref_rows = explain("lrp", model, x, 1, max_batch=1)  # the fixed-batch program's chunking
    fixed = _exported(model, x[:1], dynamic=False)
    dynamic = _exported(model, x, dynamic=True)
    for graph, want in (
        (torch.export.unflatten(fixed), ref_rows),
        (fixed.module(), ref_rows),
        (dynamic.module(), ref),
    ):
        got = explain("lrp", graph, x, 1)
        assert _relerr(got, want) < TOL, (name, type(graph).__name__)
        # conservation as the eager table conserves: the same relevance reaches the input
        assert torch.allclose(
            got.sum(dim=(1, 2, 3)),
            want.sum(dim=(1, 2, 3)),
            rtol=TOL,
            atol=TOL * float(want.abs().max()),
        )
        assert float(got[live].flatten(1).std(1).min()) > 0  # not a constant map


@pytest.mark.parametrize("name", FAST)
def test_exported_family_maps_equal_the_eager_maps(name: str) -> None:
    _check_family(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in FAMILIES if n not in FAST])
def test_every_exported_family_equals_eager(name: str) -> None:
    _check_family(name)


@pytest.mark.slow
def test_exported_inception_v3_equals_eager() -> None:
    """The one torchvision family not among the small members (at least 75 px, 27M parameters)."""
    _check("inception_v3", *bench_families.build("inception_v3"))


def _bias_free() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 5, 3, padding=1, bias=False),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(20, 3, bias=False),
    ).eval()


def test_epsilon_conserves_the_logit_on_an_exported_bias_free_net() -> None:
    net, x = _bias_free(), images(2, 8)
    with torch.no_grad():
        logit = net(x)[:, 2]
    ep = _exported(net, x, dynamic=False)
    rel = explain("lrp", ep.module(), x, 2, composite="epsilon", epsilon=1e-9, stabilizer=1e-9)
    assert torch.allclose(rel.sum(dim=(1, 2, 3)), logit, rtol=1e-4, atol=0)


@pytest.mark.parametrize("composite", COMPOSITES)
def test_every_composite_matches_on_the_graph(composite: str) -> None:
    model, size = build("resnet")
    x = images(2, size)
    ep = _exported(model, x, dynamic=True)
    ref = explain("lrp", model, x, 0, composite=composite)
    got = explain("lrp", ep.module(), x, 0, composite=composite)
    assert _relerr(got, ref) < TOL


class _ModuleDependentRules(nn.Module):
    """Operations whose eager rule depends on the module that runs them."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = BasicBlock(
            8, 8
        )  # torchvision's block: its sum gets zennit's stabilized Norm rule
        self.conv = nn.Conv2d(8, 8, 3, padding=1)  # our own residual sum below: its gradient
        self.pool = nn.AvgPool2d(3, 1, 1)  # a pooling module: the Norm rule
        self.proj = nn.Linear(8, 8)  # applied functionally below: its gradient
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.block(torch.relu(self.stem(x))))
        h = h + torch.relu(self.conv(h))
        h = F.adaptive_avg_pool2d(h, 1).flatten(1)  # functional pooling: its gradient
        h = torch.relu(F.linear(h, self.proj.weight, self.proj.bias))
        return self.head(h)


def _saved_and_loaded(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    buffer = io.BytesIO()
    torch.export.save(ep, buffer)
    buffer.seek(0)
    return torch.export.load(buffer)


def test_rules_that_depend_on_the_module_match_the_eager_ones() -> None:
    """A large stabilizer makes each choice visible: Norm rule or gradient, layer rule or gradient."""
    model, x = _ModuleDependentRules().eval(), images(2, 8)
    options = {"composite": "epsilon", "epsilon": 0.05, "stabilizer": 0.05}
    ref = explain("lrp", model, x, 1, **options)
    ep = _exported(model, x, dynamic=False)
    loaded = _saved_and_loaded(ep)  # the module stacks travel with the file (MLflow's pt2 format)
    for graph in (
        ep.module(),
        torch.export.unflatten(ep),
        loaded.module(),
        torch.export.unflatten(loaded),
    ):
        assert _relerr(explain("lrp", graph, x, 1, **options), ref) < TOL, type(graph).__name__
    rules = lrp_rules(loaded.module(), x)["operation_rules"]
    assert {"norm: residual sum", "norm: avg_pool2d", "gradient: functional conv/linear"} <= set(
        rules
    )
    assert "norm: adaptive_avg_pool2d" not in rules
    # without its module stacks the graph cannot tell: the maps are not the eager ones
    stripped = ep.module()
    for node in stripped.graph.nodes:
        node.meta.pop("nn_module_stack", None)
    assert _relerr(explain("lrp", stripped, x, 1, **options), ref) > 1e-2


def test_normalized_wrapper_around_an_exported_program() -> None:
    model, size = build("resnet")
    x = images(2, size)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    ep = _exported(model, x, dynamic=True)
    ref = explain("lrp", Normalized(model, mean, std), x, 1)
    got = explain("lrp", Normalized(torch.export.unflatten(ep), mean, std), x, 1)
    assert _relerr(got, ref) < TOL


def test_a_fixed_batch_program_runs_any_batch_row_by_row() -> None:
    model, size = build("vgg")
    x = images(5, size)
    ep = _exported(model, x[:2], dynamic=False)  # fixed to 2 rows: 5 rows = 2 + 2 + 1 (padded)
    got = explain("lrp", ep.module(), x, 0)
    ref = explain("lrp", model, x, 0, max_batch=1)
    assert _relerr(got, ref) < TOL


def test_lrp_rules_describes_the_graph_backend() -> None:
    model, size = build("efficientnet")
    x = images(1, size)
    info = lrp_rules(_exported(model, x, dynamic=False).module(), x)
    assert info["backend"] == "graph"
    assert info["fixed_batch"] == 1
    assert info["batchnorm_merged"] == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert info["fixed_gates"] == 3  # the squeeze-excitation gates of the 3 MBConv blocks
    gm = _exported(*build("mobilenet_v3")[:1], images(1, 32), dynamic=False).module()
    assert lrp_rules(gm, images(1, 32))["fixed_gates"] == 9  # also those over a 1x1 feature map
    assert "identity: silu" in info["operation_rules"]


def test_the_model_is_left_as_it_was() -> None:
    model, size = build("mobilenet_v3")
    x = images(2, size)
    gm = _exported(model, x, dynamic=True).module()
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    flags = [(m, m.training) for m in gm.modules()]
    out = gm(x)
    explain("lrp", gm, x, 0)
    assert all(m.training == f for m, f in flags)
    assert all(torch.equal(v, gm.state_dict()[k]) for k, v in before.items())
    assert torch.equal(gm(x), out)


def test_an_operation_without_a_rule_is_refused_by_name() -> None:
    class Cube(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cumsum(self.conv(x), dim=-1).flatten(1)

    x = images(1, 8)
    ep = _exported(Cube().eval(), x, dynamic=False)
    with pytest.raises(AttributionError, match=r"aten\.cumsum.*saliency"):
        explain("lrp", ep.module(), x, 0)


def test_eager_backends_refuse_an_exported_program_with_the_fix() -> None:
    model, size = build("resnet")
    x = images(1, size)
    ep = _exported(model, x, dynamic=False)
    with pytest.raises(AttributionError, match="backend='graph' or 'auto'"):
        explain("lrp", ep.module(), x, 0, backend="fast")
    with pytest.raises(AttributionError, match="explains torch.export programs"):
        explain("lrp", model, x, 0, backend="graph")


# ------------------------------------------------------------------ issue 28: tiny activations
def test_efficientnet_b0_maps_are_not_constant_and_conserve() -> None:
    """Random-weight EfficientNet-B0: maps that vary with the pixels and conserve the logit."""
    import torchvision.models as tvm

    torch.manual_seed(0)
    model = tvm.efficientnet_b0(num_classes=10).eval()
    x = images(4, 64)
    with torch.no_grad():
        logits = model(x)
    for target in (0, 3):
        maps = explain("lrp", model, x, target)
        assert float(maps.flatten(1).std(1).min()) > 0
        eps_maps = explain("lrp", model, x, target, composite="epsilon")
        assert float(eps_maps.flatten(1).std(1).min()) > 0
        # the epsilon rule conserves up to what biases absorb: same sign, same order as the logit
        sums = eps_maps.sum(dim=(1, 2, 3))
        assert torch.allclose(sums, logits[:, target], rtol=0.5, atol=0)
