"""timm models: ``model=timm`` end to end, Grad-CAM's default layer, LRP on timm's layers, every family.

The fast tests run the real ``model-audit`` Hydra app (in this process, see ``_jobkit``) on a
real SQLite store with a tiny timm ViT whose weights are a safetensors file, the loader's
refusals, the allow-list rule for ``timm.create_model`` in ``_target_`` blocks, LRP on the
two timm layer patterns that broke it (a conv with its own forward; parallel first layers)
and a few small families. The slow tests take one small member of each family the issue
lists (random weights, BatchNorm statistics calibrated, zero-initialized heads re-drawn):
every default method gives finite, non-constant maps, Grad-CAM's default layer is neither
the stem nor an identity, and a memory budget of one image runs one image per pass with the
same maps.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _families import calibrate, images
from _jobkit import ENGINE, all_runs, cli, colour_folder
from hydra import compose, initialize_config_module
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from torch import nn

from audit.engine.model import default_layer, layer_outputs
from audit.gate.loading import ModelLoadError, build_network, load_model
from audit.methods import explain
from audit.models import Normalized

timm = pytest.importorskip("timm")
from safetensors.torch import save_file  # noqa: E402 (timm installs it)
from timm.layers import Conv2dSame, ScaledStdConv2d  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
#: the audit's default methods, as conf/engine/default.yaml lists them
DEFAULT_METHODS = tuple(OmegaConf.load(ROOT / "conf" / "engine" / "default.yaml").methods)
VIT = "vit_tiny_patch16_224"
TINY_VIT = {"img_size": 48, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}


# ------------------------------------------------------------------ helpers
def build(name: str, kwargs: dict, size: int, seed: int = 0) -> nn.Module:
    """A timm member with random weights that give non-trivial maps (see the module docstring)."""
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=2, **kwargs)
    for m in model.modules():  # timm zero-initializes some heads (Hiera): every gradient would be 0
        if isinstance(m, nn.Linear) and not m.weight.any():
            nn.init.normal_(m.weight, std=0.02)
    return calibrate(model, size, seed)


def first_conv(model: nn.Module, size: int) -> nn.Module:
    """The first conv to run: the stem or the patch embedding (DaViT's pads the input first)."""
    found: list[nn.Module] = []
    handles = [
        m.register_forward_pre_hook(lambda m, _a: found.append(m))
        for m in model.modules()
        if isinstance(m, nn.Conv2d)
    ]
    try:
        with torch.no_grad():
            model(torch.rand(1, 3, size, size))
    finally:
        for h in handles:
            h.remove()
    return found[0]


def check_family(name: str, kwargs: dict, size: int, memory: bool = True) -> None:
    """Every default method gives finite, non-constant maps; Grad-CAM's default layer is no stem,
    patch embedding or identity; with a memory budget of one image, one image per pass, as the
    torchvision families' budget tests pin it (tests/methods/test_memory_bound.py)."""
    model = build(name, kwargs, size)
    x = images(2, size)
    with torch.no_grad():
        target = model(x).argmax(1)
    layer, module = default_layer(model, x)
    out = next(o for o in reversed(layer_outputs(model, x)) if o.name == layer)
    assert not isinstance(module, nn.Identity) and not out.passthrough and not out.in_attention, (
        layer
    )
    stem = first_conv(model, size)
    assert not any(m is stem for m in module.modules()), (
        f"{name}: Grad-CAM's default layer {layer} holds the stem"
    )
    for method in DEFAULT_METHODS:
        maps = explain(method, model, x, target)
        assert maps.shape == (2, 1, size, size) and torch.isfinite(maps).all(), (name, method)
        spread = maps.flatten(1).std(1)
        if (
            method == "gradcam"
        ):  # its ReLU may zero one class's map on random weights: one class must show
            spread = torch.maximum(spread, explain(method, model, x, 1 - target).flatten(1).std(1))
        assert (spread > 0).all(), (name, method, layer)
        if memory:
            sizes: list[int] = []
            handle = model.register_forward_pre_hook(
                lambda _m, a, seen=sizes: seen.append(a[0].shape[0])
            )
            try:
                chunked = explain(method, model, x, target, memory_budget=1)
            finally:
                handle.remove()
            assert set(sizes) == {1}, (name, method, sizes)
            # the same maps as each image explained on its own (a batch of two may take other kernels,
            # whose rounding LRP's stabilizers amplify; EfficientFormer's input gradient even changes
            # with the batch: timm's, found while writing this test)
            alone = torch.cat(
                [explain(method, model, x[i : i + 1], target[i : i + 1]) for i in range(2)]
            )
            torch.testing.assert_close(
                chunked, alone, rtol=1e-5, atol=1e-7 * float(alone.abs().max())
            )


def tiny_vit_weights(folder: Path, seed: int = 0, suffix: str = ".safetensors") -> Path:
    torch.manual_seed(seed)
    model = timm.create_model(VIT, num_classes=2, **TINY_VIT)
    path = folder / f"vit{suffix}"
    if suffix == ".safetensors":
        save_file(model.state_dict(), path)
    else:
        torch.save(model.state_dict(), path)
    return path


def timm_args(weights: Path, *extra: str) -> list[str]:
    return [
        "model=timm",
        f"model.name={VIT}",
        "model.num_classes=2",
        f"model.path={weights}",
        *[f"model.kwargs.{k}={v}" for k, v in TINY_VIT.items()],
        *extra,
    ]


# ------------------------------------------------------------------ model=timm through the Hydra app
def test_a_timm_model_with_safetensors_weights_is_audited_end_to_end(
    tracking_uri, tmp_path
) -> None:
    weights = tiny_vit_weights(tmp_path)
    # the probe folder holds 32 px images; the model takes 48 (model.kwargs.img_size): probes.transform
    probes = ["probes=folder", f"probes.path={colour_folder(tmp_path, 8)}", *ENGINE]
    res = cli(
        [
            *timm_args(weights, "model.kwargs.drop_rate=0.1"),
            *probes,
            f"tracking.uri={tracking_uri}",
        ],
        tmp_path,
    )
    assert res.code in (0, 1), (
        res.out + res.err
    )  # a verdict (random weights: FAIL or INCONCLUSIVE), no error
    assert not res.errors
    report = json.loads((tmp_path / "reports" / "vit" / "report.json").read_text())
    assert report["model"]["kind"] == "timm" and report["probes"]["size"] == [48, 48]
    client = MlflowClient(tracking_uri)
    (run,) = all_runs(client)
    assert (
        run.info.status == "FINISHED"
        and run.data.tags["audit.weights_sha256"] == report["model"]["weights_sha256"]
    )
    config = OmegaConf.load(
        client.download_artifacts(run.info.run_id, "audit_config.yaml", str(tmp_path))
    )
    assert (
        config.model.kwargs.drop_rate == 0.1 and config.model.kwargs.img_size == 48
    )  # set without '+'


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["model.pretrained=true"], "model.pretrained=True: the audit downloads nothing"),
        (
            ["model.name=resnet181"],
            "model.name 'resnet181' is not a model timm registers (closest: resnet18",
        ),
        (["model.kwargs.checkpoint_path=/etc/passwd"], "model.kwargs.checkpoint_path is refused"),
        (
            ["model.allowed_targets=[audit.models.*]"],
            "model.kind=timm: its builder 'timm.create_model' is not in",
        ),
    ],
)
def test_bad_timm_configs_exit_2_with_one_line_and_write_nothing(
    tracking_uri, tmp_path, extra, message
) -> None:
    weights = tiny_vit_weights(tmp_path)
    res = cli(
        [*timm_args(weights, *extra), "probes.size=48", f"tracking.uri={tracking_uri}"], tmp_path
    )
    assert res.code == 2, res.out + res.err
    assert len(res.errors) == 1 and message in res.errors[0], res.err
    db = Path(tracking_uri.removeprefix("sqlite:///"))
    assert (
        not db.exists() or all_runs(MlflowClient(tracking_uri)) == []
    )  # no store made, or no run in it
    reports = tmp_path / "reports"
    assert not reports.exists() or not list(reports.rglob("*"))
    assert "Traceback" not in res.err + res.out


def test_constructor_arguments_need_no_plus_and_other_keys_stay_closed() -> None:
    with initialize_config_module(config_module="audit.conf", version_base="1.3"):
        cfg = compose(
            "audit",
            overrides=["model=timm", "model.kwargs.drop_rate=0.1", "model.kwargs.img_size=[32,48]"],
        )
        assert cfg.model.kwargs == {"drop_rate": 0.1, "img_size": [32, 48]}
        assert cfg.model.allowed_targets == ["timm.create_model"] and cfg.model.pretrained is False
        # the example of conf/model/state_dict.yaml and docs/options.md works as written
        cfg = compose(
            "audit",
            overrides=[
                "model=state_dict",
                "model.target._target_=torchvision.models.resnet18",
                "model.target.num_classes=2",
            ],
        )
        assert cfg.model.target == {"_target_": "torchvision.models.resnet18", "num_classes": 2}
        for typo in ("model.nmae=resnet18", "model.kwargs_drop_rate=0.1"):
            with pytest.raises(Exception, match="Could not override"):
                compose("audit", overrides=["model=timm", typo])


# ------------------------------------------------------------------ the loader
def test_the_loader_uses_timm_s_normalization_and_input_size_and_the_file_s_weights(
    tmp_path,
) -> None:
    torch.manual_seed(0)
    net = timm.create_model("resnet18", num_classes=3)
    torch.save(net.state_dict(), tmp_path / "r.pt")
    loaded = load_model(
        {
            "kind": "timm",
            "name": "resnet18",
            "num_classes": 3,
            "path": str(tmp_path / "r.pt"),
            "allowed_targets": ["timm.create_model"],
        }
    )
    assert isinstance(loaded.model, Normalized) and loaded.input_size == (
        224,
        224,
    )  # timm's pretrained config
    assert loaded.model.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])
    assert loaded.name == "r" and loaded.kind == "timm" and len(loaded.weights_sha256) == 64
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        want = net.eval()((x - loaded.model.mean) / loaded.model.std)
        torch.testing.assert_close(loaded.model(x), want)
    own = load_model(
        {
            "kind": "timm",
            "name": "resnet18",
            "num_classes": 3,
            "path": str(tmp_path / "r.pt"),
            "input_size": 64,
            "normalization": {"mean": [0, 0, 0], "std": [1, 1, 1]},
            "allowed_targets": ["timm.create_model"],
        }
    )
    assert (
        own.input_size == (64, 64) and own.model.mean.abs().sum() == 0
    )  # the config wins, applied once


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_classes": 5}, r"do not fit timm's 'resnet18': shape mismatches: \['fc.weight"),
        ({"name": "resnet34"}, r"do not fit timm's 'resnet34': missing keys"),
        ({"kwargs": {"pretrained_cfg": "hf-hub:org/x"}}, "model.kwargs.pretrained_cfg is refused"),
        ({"kwargs": {"act_layer": {"_target_": "os.system"}}}, "keys must be plain names"),
        ({"num_classes": "2"}, "model.num_classes must be a positive integer"),
        ({"path": "missing.safetensors"}, "no such file"),
        (
            {"input_size": [0, 4]},
            r"model.input_size must be one positive integer or \[height, width\]",
        ),
    ],
)
def test_the_loader_refuses_with_the_fix(tmp_path, monkeypatch, change, message) -> None:
    monkeypatch.chdir(tmp_path)
    torch.save(timm.create_model("resnet18", num_classes=2).state_dict(), "r.pt")
    src = {
        "kind": "timm",
        "name": "resnet18",
        "num_classes": 2,
        "path": "r.pt",
        "allowed_targets": ["timm.create_model"],
        **change,
    }
    with pytest.raises(ModelLoadError, match=message):
        load_model(src)


# ------------------------------------------------------------------ _target_: timm.create_model
def test_an_exact_allow_list_entry_vouches_for_its_definition_in_the_same_package(
    tmp_path, monkeypatch
) -> None:
    net = {"_target_": "timm.create_model", "model_name": "resnet18", "num_classes": 2}
    assert type(build_network(net, ["timm.create_model"])).__name__ == "ResNet"
    # a glob never reaches the private timm.models._factory; the error names the exact entry to add
    with pytest.raises(
        ModelLoadError, match=r"e\.g\. model\.allowed_targets=\[timm\.\*,timm\.create_model\]"
    ):
        build_network(net, ["timm.*"])
    # what timm fetches by name or reads from a file is refused as pretrained weights are
    for bad in ({"model_name": "hf-hub:org/model"}, {"checkpoint_path": "w.pth"}):
        with pytest.raises(ModelLoadError, match="asks for pretrained weights"):
            build_network({**net, **bad}, ["timm.create_model"])
    # an exact entry does not vouch for a re-export of another package's function
    (tmp_path / "reexports.py").write_text("from shutil import copyfile\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    evil = {"_target_": "reexports.copyfile", "src": "a", "dst": "b"}
    with pytest.raises(ModelLoadError, match="is defined as 'shutil.copyfile', which is not in"):
        build_network(evil, ["reexports.copyfile"])


# ------------------------------------------------------------------ LRP on timm's layers
class _SameNet(nn.Module):
    """timm's dynamic 'same' padding (stride 2 on an odd size) and a weight-standardized conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = Conv2dSame(3, 6, 3, stride=2, bias=False)
        self.conv2 = ScaledStdConv2d(6, 8, 3, padding=1, bias=False)
        self.fc = nn.Linear(8, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).amax(dim=(2, 3)))


class _ParallelStem(nn.Module):
    """Two convs read the input side by side; the one registered first runs second (FastViT's stem)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Conv2d(3, 6, 1, bias=False)
        self.kxk = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.fc = nn.Linear(6, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.kxk(x)
        y = y + self.scale(x)
        return self.fc(torch.relu(y).amax(dim=(2, 3)))


@pytest.mark.parametrize("net", [_SameNet, _ParallelStem])
def test_lrp_conserves_the_logit_on_timm_s_layer_patterns(net) -> None:
    """Bias-free ReLU networks with max pooling: the epsilon rule's relevance sums to the logit
    (before: a size mismatch on the padded conv, and 'runs before the first layer' on the stem)."""
    torch.manual_seed(0)
    model = net().eval()
    x = torch.rand(3, 3, 16, 16)  # 'same' padding of a stride-2 conv on 16 px: 0 before, 1 after
    with torch.no_grad():
        logits = model(x)
    target = logits.argmax(1)
    relevance = explain("lrp", model, x, target, composite="epsilon", epsilon=1e-9)
    torch.testing.assert_close(
        relevance.sum(dim=(1, 2, 3)), logits.gather(1, target[:, None])[:, 0], rtol=1e-4, atol=1e-6
    )
    assert (relevance.flatten(1).std(1) > 0).all()


def test_a_conv_whose_forward_is_not_pad_then_conv_is_refused_naming_other_methods() -> None:
    class Doubled(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x * 2)

    model = nn.Sequential(
        Doubled(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    ).eval()
    with pytest.raises(
        Exception, match=r"changes its input before the convolution .*use another method \(gradcam"
    ):
        explain("lrp", model, torch.rand(2, 3, 8, 8), 0)


# ------------------------------------------------------------------ families
#: one small member of each family of issue 28: (timm name, create_model arguments, input size)
FAMILIES: dict[str, tuple[str, dict, int]] = {
    "resnet_d": ("resnet18d", {}, 64),
    "resnest": ("resnest14d", {}, 64),
    "regnetz": ("regnetz_005", {}, 64),
    "nfnet": ("dm_nfnet_f0", {}, 64),
    "efficientnet": ("efficientnet_b0", {}, 64),
    "mobilenetv3": ("mobilenetv3_small_050", {}, 64),
    "mobilenetv4": ("mobilenetv4_conv_small_035", {}, 64),
    "convnext": ("convnext_atto", {}, 64),
    "convnextv2": ("convnextv2_atto", {}, 64),
    "poolformer": ("poolformer_s12", {}, 64),
    "caformer": ("caformer_s18", {}, 64),
    "edgenext": ("edgenext_xx_small", {}, 64),
    "fastvit": ("fastvit_t8", {}, 64),
    "repvit": ("repvit_m0_9", {}, 64),
    "mobilevit": ("mobilevit_xxs", {}, 64),
    "efficientvit": ("efficientvit_b0", {}, 64),
    "efficientvit_m": ("efficientvit_m0", {"img_size": 64}, 64),
    "efficientformer": (
        "efficientformer_l1",
        {},
        224,
    ),  # its last stage's attention is fixed at 7x7
    "efficientformerv2": ("efficientformerv2_s0", {"img_size": 64}, 64),
    "levit": ("levit_128s", {"img_size": 128}, 128),  # at 64 px its last stage is one token
    "vit": ("vit_tiny_patch16_224", {"img_size": 64}, 64),
    "deit": ("deit_tiny_patch16_224", {"img_size": 64}, 64),
    "eva02": ("eva02_tiny_patch14_224", {"img_size": 56}, 56),
    "swin": ("swin_tiny_patch4_window7_224", {"img_size": 56, "window_size": 7}, 56),
    "maxvit": ("maxvit_pico_rw_256", {"img_size": 64}, 64),
    "coatnet": ("coatnet_nano_cc_224", {"img_size": 64}, 64),
    "tinyvit": ("tiny_vit_5m_224", {}, 64),
    "xcit": ("xcit_nano_12_p16_224", {"img_size": 64}, 64),
    "pit": ("pit_ti_224", {"img_size": 64}, 64),
    "cait": ("cait_xxs24_224", {"img_size": 64}, 64),
    "hiera": ("hiera_tiny_224", {"img_size": (64, 64)}, 64),
    "davit": ("davit_tiny", {}, 64),
}
#: the fast subset: a CNN, a ConvNeXt (identity norm_pre), a shared activation (EfficientViT-M),
#: parallel stem convs (FastViT), a shrunk ViT (k_norm identity inside attention) and a shrunk
#: channels-last Swin, small enough for the default suite
FAST: dict[str, tuple[str, dict, int]] = {
    "mobilenetv3": FAMILIES["mobilenetv3"],
    "convnext": FAMILIES["convnext"],
    "efficientvit_m": ("efficientvit_m0", {"img_size": 64}, 64),
    "fastvit": ("fastvit_t8", {}, 32),
    "vit": (
        VIT,
        {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2},
        32,
    ),
    "swin": (
        "swin_tiny_patch4_window7_224",
        {"img_size": 32, "window_size": 4, "embed_dim": 16, "depths": (1, 1), "num_heads": (1, 2)},
        32,
    ),
}


@pytest.mark.parametrize("family", sorted(FAST))
def test_small_timm_families_work_with_every_default_method(family: str) -> None:
    check_family(*FAST[family], memory=family == "vit")


@pytest.mark.parametrize(
    ("family", "layer"),
    [
        ("vit", "blocks.1.norm1"),  # not blocks.1.attn.k_norm (an Identity inside the attention)
        ("convnext", "stages"),  # not norm_pre (an Identity after the stages)
        # not stages.2.downsample.patchmerge.act, a ReLU run twice per pass; at 64 px the last stage is
        # 1x1, so the last map of more than one cell is the 2x2 one in front of its downsampling
        ("efficientvit_m", "stages.2.downsample.patchmerge.conv1"),
    ],
)
def test_grad_cam_default_layer_on_timm(family: str, layer: str) -> None:
    name, kwargs, size = FAST[family]
    model = build(name, kwargs, size)
    assert default_layer(model, images(1, size))[0] == layer


def test_a_channels_last_map_without_a_permute_module_is_read_as_nhwc() -> None:
    name, kwargs, size = FAST["swin"]
    model = build(name, kwargs, size)
    x = images(1, size)
    layer = default_layer(model, x)[0]
    out = next(o for o in reversed(layer_outputs(model, x)) if o.name == layer)
    assert out.layout == "NHWC" and out.grid == (0, size // 8, size // 8), out


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_timm_family_works_with_every_default_method(family: str) -> None:
    check_family(*FAMILIES[family])
