"""Tests of foldattn.stripe (recording), foldattn.stripe.plots (pictures) and ``foldattn stripe``."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from foldattn import attention
from foldattn.cli import main
from foldattn.models import create_model
from foldattn.stripe import (
    NoAttentionError,
    StripeHistory,
    StripeRecorder,
    StripeResult,
    attention_kinds,
    constancy,
    find_attention,
    record_stripes,
    stripe_score,
)
from foldattn.stripe.plots import plot_heatmaps, plot_history, plot_summary
from foldattn.stripe.statistics import _Moments  # the streaming moments, tested on their own

torch.set_num_threads(1)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _batches(n_batches: int = 3, batch: int = 5, shape: tuple[int, ...] = (3, 8, 8), seed: int = 0,
             positive: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        x = torch.rand(batch, *shape, generator=g, dtype=torch.float64)
        out.append((x + 0.5 if positive else x * 2 - 1, torch.randint(0, 10, (batch,), generator=g)))
    return out


def _tiny(att: str = "se") -> nn.Module:
    return create_model("cifar_resnet20", num_classes=10, attention=att).double()


# ----------------------------------------------------------------------------- statistics
@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(0, 7), min_size=1, max_size=6), channels=st.integers(1, 5))
def test_moments_match_two_pass(sizes: list[int], channels: int) -> None:
    g = torch.Generator().manual_seed(sum(sizes) + channels)
    chunks = [torch.randn(n, channels, generator=g, dtype=torch.float64) * 3 + 1 for n in sizes]
    m = _Moments()
    for c in chunks:
        m.update(c)
    allx = torch.cat(chunks)
    stats = m.stats()
    assert stats.count == allx.shape[0]
    if allx.shape[0]:
        torch.testing.assert_close(torch.tensor(stats.mean, dtype=torch.float64), allx.mean(0), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(torch.tensor(stats.std, dtype=torch.float64), allx.std(0, unbiased=False),
                                   rtol=1e-10, atol=1e-12)
    else:
        assert stats.mean == [] and stats.std == []


def test_stripe_score_extremes() -> None:
    assert stripe_score([0.2, 0.8, 0.5], [0.0, 0.0, 0.0]) == 1.0          # constant columns
    assert stripe_score([0.5, 0.5, 0.5], [0.1, 0.2, 0.3]) == 0.0          # no channel structure
    assert stripe_score([0.5, 0.5], [0.0, 0.0]) == 1.0                    # nothing varies at all
    # between-channel variance 0.09 (means 0.2, 0.8), within 0.09: half explained by the channel
    assert stripe_score([0.2, 0.8], [0.3, 0.3]) == pytest.approx(0.5)
    assert math.isnan(stripe_score([], []))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.floats(-5, 5), st.floats(0, 5)), min_size=1, max_size=20))
def test_stripe_score_bounded(pairs: list[tuple[float, float]]) -> None:
    mean, std = zip(*pairs, strict=True)
    assert 0.0 <= stripe_score(mean, std) <= 1.0


def test_constancy() -> None:
    assert constancy([0.3, 0.7], [0.0, 0.0]) == 1.0
    # a gate that only takes the values 0 and 1 has the largest spread its mean allows
    bern = torch.tensor([[0.0, 1.0], [1.0, 1.0], [0.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    assert constancy(bern.mean(0), bern.std(0, unbiased=False)) == pytest.approx(0.0, abs=1e-12)
    assert constancy([0.5], [0.25]) == pytest.approx(0.5)
    assert constancy([0.0, 1.0], [0.0, 0.0]) == 1.0
    assert math.isnan(constancy([], []))


def test_constancy_nan_outside_unit_interval() -> None:
    r = record_stripes(_tiny(), _batches(1), max_samples=0)
    s = r.layers[0].summary()
    assert 0 <= s["gate_constancy"] <= 1 and math.isnan(s["descriptor_constancy"])  # descriptors are not in [0, 1]


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(2, 30), st.integers(0, 10_000))
def test_constancy_bounded_for_unit_gates(channels: int, images: int, seed: int) -> None:
    a = torch.rand(images, channels, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) ** 3
    assert 0.0 <= constancy(a.mean(0), a.std(0, unbiased=False)) <= 1.0


def test_stripe_score_equals_eta_squared_of_matrix() -> None:
    a = torch.rand(50, 6, dtype=torch.float64) * torch.linspace(0.1, 1, 6, dtype=torch.float64)
    total = a.var(unbiased=False)
    between = a.mean(0).var(unbiased=False)
    assert stripe_score(a.mean(0), a.std(0, unbiased=False)) == pytest.approx(float(between / total), rel=1e-12)


# ----------------------------------------------------------------------------- finding modules
def test_find_attention_project_model_and_asr() -> None:
    assert [s.name for s in find_attention(_tiny())][:2] == ["layer1.0.attention", "layer1.1.attention"]
    both = create_model("cifar_resnet20", attention="se", asr=True, both=True)
    sites = find_attention(both)
    assert len(sites) == 9 and all(s.name.endswith(".attention") for s in sites)  # ASR layers skipped
    with pytest.raises(NoAttentionError, match="ASR layers are constant"):
        find_attention(create_model("cifar_resnet20", attention="se", asr=True))


def test_no_attention_lists_kinds() -> None:
    with pytest.raises(NoAttentionError) as e:
        record_stripes(create_model("cifar_resnet20"), _batches())
    msg = str(e.value)
    for kind in attention_kinds():
        assert kind in msg
    assert "torchvision.SqueezeExcitation" in msg and "timm" in msg


def test_unknown_layer_lists_available() -> None:
    with pytest.raises(ValueError, match=r"match no attention module; available: layer1\.0\.attention"):
        record_stripes(_tiny(), _batches(), layers=["layer9.*"])


def test_layer_glob_selection() -> None:
    r = record_stripes(_tiny(), _batches(1), layers=["layer2.*", "layer3.2.attention"], max_samples=0)
    assert [x.name for x in r.layers] == ["layer2.0.attention", "layer2.1.attention", "layer2.2.attention",
                                          "layer3.2.attention"]


# ----------------------------------------------------------------------------- recording values
def _true_gates(model: nn.Module, module: nn.Module, batches: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Gates and pooled inputs of ``module`` computed independently of the recorder."""
    gates, descs = [], []

    def hook(m: nn.Module, args: tuple, out: torch.Tensor) -> None:
        x = args[0]
        gates.append(m.gate(m.descriptor(x)).detach())
        descs.append(x.mean(dim=(2, 3)).detach())

    h = module.register_forward_hook(hook)
    model.eval()
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    h.remove()
    return torch.cat(gates), torch.cat(descs)


@pytest.mark.parametrize("att", ["se", "eca", "srm", "ie", "ge", "spa", "cbam"])
def test_recorded_statistics_are_the_gates(att: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), attention.create(att, 8, reduction=2)
                          if att in ("se", "spa", "cbam") else attention.create(att, 8),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).double()
    data = _batches(3, 6)
    g, d = _true_gates(model, model[2], data)
    r = record_stripes(model, data, max_samples=4, seed=1)
    layer = r.layer("2")
    assert r.num_images == 18 and layer.gate.count == 18 and layer.channels == 8
    torch.testing.assert_close(torch.tensor(layer.gate.mean, dtype=torch.float64), g.mean(0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.tensor(layer.gate.std, dtype=torch.float64), g.std(0, unbiased=False),
                               rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(torch.tensor(layer.descriptor.mean, dtype=torch.float64), d.mean(0),
                               rtol=1e-10, atol=1e-12)
    # the sampled rows are the gates of the sampled images
    assert len(r.sample_indices) == 4 == len(layer.gate_sample) == len(layer.descriptor_sample)
    sampled = torch.tensor(layer.gate_sample, dtype=torch.float64)
    torch.testing.assert_close(sampled, g[r.sample_indices].float().double())


def test_dia_chain_records_every_block() -> None:
    r = record_stripes(create_model("cifar_resnet20", attention="dia"), _batches(2, 4, positive=True), max_samples=2)
    assert len(r.layers) == 9 and all(x.gate.count == 8 for x in r.layers)


def _gate_from_ratio(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """For ``out = x * gate``: the gate, read off at one position of a positive input."""
    with torch.no_grad():
        return (module(x) / x)[:, :, 0, 0]


def _third_party_modules() -> list[tuple[str, nn.Module]]:
    from torchvision.ops import SqueezeExcitation

    mods: list[tuple[str, nn.Module]] = [("torchvision", SqueezeExcitation(8, 2))]
    timm = pytest.importorskip("timm")
    from timm.layers.cbam import ChannelAttn
    from timm.models._efficientnet_blocks import SqueezeExcite

    mods += [("timm-se", timm.layers.SEModule(8, rd_ratio=0.25)), ("timm-ese", timm.layers.EffectiveSEModule(8)),
             ("timm-eca", timm.layers.EcaModule(8)), ("timm-ceca", timm.layers.CecaModule(8)),
             ("timm-cbam-channel", ChannelAttn(8, rd_ratio=0.25)), ("timm-effnet-se", SqueezeExcite(8))]
    return mods


@pytest.mark.parametrize("label", ["torchvision", "timm-se", "timm-ese", "timm-eca", "timm-ceca",
                                   "timm-cbam-channel", "timm-effnet-se"])
def test_third_party_gate_not_x_times_gate(label: str) -> None:
    module = dict(_third_party_modules())[label].double()
    model = nn.Sequential(module).eval()
    data = _batches(2, 5, shape=(8, 4, 4), positive=True)
    truth = torch.cat([_gate_from_ratio(module, x) for x, _ in data])
    r = record_stripes(model, data, max_samples=3)
    (layer,) = r.layers
    assert layer.kind in ("torchvision.SqueezeExcitation", "timm") and layer.channels == 8
    torch.testing.assert_close(torch.tensor(layer.gate.mean, dtype=torch.float64), truth.mean(0), rtol=1e-9, atol=1e-12)
    pooled = torch.cat([x.mean((2, 3)) for x, _ in data])
    torch.testing.assert_close(torch.tensor(layer.descriptor.mean, dtype=torch.float64), pooled.mean(0))


def test_timm_cbam_module_finds_channel_gate() -> None:
    timm_cbam = pytest.importorskip("timm.layers.cbam")
    model = nn.Sequential(nn.Conv2d(3, 8, 1), timm_cbam.CbamModule(8, rd_ratio=0.25))
    assert [s.name for s in find_attention(model)] == ["1.channel"]


def test_torchvision_mobilenet_records() -> None:
    import torchvision

    model = torchvision.models.mobilenet_v3_small(num_classes=4)
    r = record_stripes(model, _batches(1, 2, shape=(3, 32, 32)), max_samples=2)
    assert len(r.layers) == 9 and all(0 <= v <= 1 for x in r.layers for v in x.gate.mean)


# ----------------------------------------------------------------------------- the recorder's hygiene
def test_hooks_removed_and_modes_restored() -> None:
    model = _tiny().train()
    record_stripes(model, _batches(1))
    assert model.training and all(m.training for m in model.modules())
    for m in model.modules():
        assert "gate" not in m.__dict__
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_hooks_removed_after_error() -> None:
    model = _tiny()
    with pytest.raises(ValueError):
        record_stripes(model, [torch.randn(2, 1, 8, 8, dtype=torch.float64)])
    assert all("gate" not in m.__dict__ and not m._forward_pre_hooks for m in model.modules())


def test_recorded_model_output_unchanged() -> None:
    model = _tiny().eval()
    x = _batches(1)[0][0]
    with torch.no_grad():
        ref = model(x)
        with StripeRecorder(model) as rec:
            out = model(x)
            rec.step(x.shape[0])
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert rec.result().num_images == x.shape[0]


def test_max_images_and_batch_formats() -> None:
    data = _batches(4, 5)
    r = record_stripes(_tiny(), data, max_images=7, max_samples=100)
    assert r.num_images == 7 and r.layers[0].gate.count == 7 and r.sample_indices == list(range(7))
    dict_batches = [{"image": x, "label": y} for x, y in data[:1]]
    assert record_stripes(_tiny(), dict_batches).num_images == 5
    assert record_stripes(_tiny(), [x for x, _ in data[:1]]).num_images == 5


@pytest.mark.parametrize(
    ("loader", "error", "match"),
    [
        ([], ValueError, "loader yielded nothing"),
        ([torch.randn(2, 1, 8, 8, dtype=torch.float64)], ValueError, r"cannot run on images of shape \(2, 1, 8, 8\)"),
        ([torch.randn(2, 192, dtype=torch.float64)], ValueError, r"expected a batch of images \(N, C, H, W\)"),
        (["not a tensor"], TypeError, "must yield image tensors"),
        ([{"pixels": torch.zeros(1)}], TypeError, "cannot find the images"),
    ],
)
def test_bad_loaders(loader: list, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        record_stripes(_tiny(), loader)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="max_images"):
        record_stripes(_tiny(), _batches(), max_images=0)
    with pytest.raises(ValueError, match="max_samples"):
        StripeRecorder(_tiny(), max_samples=-1)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        find_attention("model")  # type: ignore[arg-type]


def test_reservoir_is_seeded_and_uniform_sized() -> None:
    data = _batches(6, 5)
    a = record_stripes(_tiny(), data, max_samples=4, seed=3)
    b = record_stripes(_tiny(), data, max_samples=4, seed=3)
    assert a.sample_indices == b.sample_indices and len(a.sample_indices) == 4
    assert len(set(a.sample_indices)) == 4 and max(a.sample_indices) < 30


# ----------------------------------------------------------------------------- serialisation
def test_result_json_round_trip(tmp_path) -> None:
    r = record_stripes(_tiny(), _batches(1), max_samples=2)
    r.save(tmp_path / "r.json")
    back = StripeResult.load(tmp_path / "r.json")
    assert json.dumps(back.to_dict()) == json.dumps(r.to_dict())  # (NaN != NaN, so compare the text)
    assert back.summary().keys() == r.summary().keys()
    assert "layer3.2.attention" in r.table()
    with pytest.raises(KeyError, match=r"recorded: layer1\.0\.attention"):
        r.layer("nope")
    with pytest.raises(ValueError, match="not a stripe result"):
        StripeResult.from_dict({"format": "other"})


def _same(a: object, b: object) -> bool:
    """Equal, NaN equal to NaN."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_history(tmp_path) -> None:
    model, data = _tiny(), _batches(1)
    h = StripeHistory()
    h.append(0, record_stripes(model, data, max_samples=0))
    h.append(2, record_stripes(model, data, layers=["layer1.*"], max_samples=0))
    with pytest.raises(ValueError, match="epochs must increase"):
        h.append(2, record_stripes(model, data, max_samples=0))
    assert len(h) == 2 and h.epochs == [0, 2]
    series = h.series("gate_mean_std")
    assert len(series) == 9 and math.isnan(series["layer3.0.attention"][1])
    h.save(tmp_path / "h.json")
    assert _same(StripeHistory.load(tmp_path / "h.json").to_dict(), h.to_dict())  # NaN written as null, read as NaN
    assert "NaN" not in (tmp_path / "h.json").read_text()  # strict JSON


# ----------------------------------------------------------------------------- pictures
def test_plots_write_png_and_json(tmp_path) -> None:
    model, data = _tiny(), _batches(2)
    r = record_stripes(model, data, max_samples=6)
    h = StripeHistory()
    h.append(0, r)
    h.append(1, record_stripes(model, data, max_samples=0))
    paths = [*plot_heatmaps(r, tmp_path / "heat.png", layers=["layer1.0.attention", "layer3.2.attention"]),
             *plot_summary(r, tmp_path / "sum.png"), *plot_history(h, tmp_path / "curves.png")]
    for p in paths:
        assert p.exists() and p.stat().st_size > 0
    for p in paths[::2]:
        assert p.read_bytes()[:8] == PNG_MAGIC
    heat = json.loads((tmp_path / "heat.json").read_text())
    assert [x["name"] for x in heat["layers"]] == ["layer1.0.attention", "layer3.2.attention"]
    assert len(heat["layers"][0]["gate"]) == 6
    assert json.loads((tmp_path / "curves.json").read_text())["epochs"] == [0, 1]
    assert sorted(x.name for x in tmp_path.iterdir()) == sorted(p.name for p in paths)  # no temp files left


def test_plot_errors(tmp_path) -> None:
    r = record_stripes(_tiny(), _batches(1), max_samples=0)
    with pytest.raises(ValueError, match="max_samples > 0"):
        plot_heatmaps(r, tmp_path / "h.png")
    with pytest.raises(ValueError, match=r"must end in \.png"):
        plot_summary(r, tmp_path / "h.jpg")
    with pytest.raises(ValueError, match="history is empty"):
        plot_history(StripeHistory(), tmp_path / "c.png")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plot_summary(r, tmp_path / "missing" / "s.png")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- CLI
def test_cli_stripe(tmp_path, capsys) -> None:
    out = tmp_path / "o"
    rc = main(["stripe", "cifar_resnet20", "--attention", "se", "--max-images", "24", "--samples", "8",
               "--batch-size", "16", "--unit-scale", "--heatmap-layers", "layer1.0.attention", "-o", str(out)])
    assert rc == 0
    assert {"stripes.json", "stripe_summary.png", "stripe_summary.json", "stripe_heatmaps.png",
            "stripe_heatmaps.json"} <= {p.name for p in out.iterdir()}
    r = StripeResult.load(out / "stripes.json")
    assert r.num_images == 24 and r.meta["data"] == "digits" and len(r.layers) == 9
    assert "layer3.2.attention" in capsys.readouterr().out
    heat = json.loads((out / "stripe_heatmaps.json").read_text())
    assert [x["name"] for x in heat["layers"]] == ["layer1.0.attention"]
    # plotting a history written during training, without a model
    h = StripeHistory()
    h.append(1, r)
    h.save(tmp_path / "h.json")
    assert main(["stripe", "--history", str(tmp_path / "h.json"), "-o", str(out)]) == 0
    assert (out / "stripe_curves.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["cifar_resnet20"], "no input-dependent channel-attention module"),
        (["cifar_resnet20", "--attention", "se", "--layers", "layer7.*"], "available: layer1.0.attention"),
        (["no_such_model"], "neither a file nor a model name"),
        (["cifar_resnet20", "--attention", "se", "--max-images", "0"], "max-images"),
        ([], "give a model"),
    ],
)
def test_cli_stripe_errors(tmp_path, capsys, argv: list[str], match: str) -> None:
    rc = main(["stripe", *argv, "-o", str(tmp_path)] + ([] if "--max-images" in argv else ["--max-images", "8"]))
    assert rc == 2
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if "error" in line]  # argparse's usage lines aside
    assert len(lines) == 1 and lines[0].startswith("foldattn stripe: error:") and "Traceback" not in err
    assert match in err


def test_monitor_records_every_n_and_resumes(tmp_path) -> None:
    from foldattn.stripe import StripeMonitor

    model, data = _tiny(), _batches(1, 4)
    mon = StripeMonitor(every=2, output_dir=tmp_path, max_images=4, max_samples=2)
    assert len(mon.check(model)) == 9
    assert [mon(e, model, data) is not None for e in (1, 2, 3, 4)] == [False, True, False, True]
    assert StripeHistory.load(tmp_path / "stripe_history.json").epochs == [2, 4]
    for name in ("stripe_curves.png", "stripe_curves.json", "stripes.json", "stripe_heatmaps.png"):
        assert (tmp_path / name).exists()
    resumed = StripeMonitor(every=2, output_dir=tmp_path, max_images=4, max_samples=0)
    resumed(4, model, data)  # a run resumed from epoch 3 replays epoch 4
    assert resumed.history.epochs == [2, 4]
    with pytest.raises(ValueError, match="stripe-every"):
        StripeMonitor(every=0, output_dir=tmp_path)
    with pytest.raises(NoAttentionError):
        StripeMonitor(every=1, output_dir=tmp_path).check(create_model("cifar_resnet20"))


def test_cli_stripe_bad_checkpoint(tmp_path, capsys) -> None:
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["stripe", str(bad), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "foldattn stripe: error:" in err and "checkpoint" in err and "Traceback" not in err


def test_register_custom_kind() -> None:
    from foldattn import stripe

    class MyGate(nn.Module):  # a user's own attention: x * sigmoid(w * mean(x))
        def __init__(self, c: int) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(c))
            self.act = nn.Sigmoid()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.act(self.w * x.mean((2, 3)))[:, :, None, None]

    def attach(m: nn.Module, tap: stripe.Tap) -> list:
        return [m.act.register_forward_hook(lambda mod, args, out: tap.add_gate(out)),
                m.register_forward_pre_hook(lambda mod, args: tap.add_descriptor(args[0].mean((2, 3))))]

    kind = stripe.AttentionKind("MyGate", lambda m: isinstance(m, MyGate), attach, lambda m: m.w.numel())
    stripe.register_kind(kind)
    try:
        with pytest.raises(ValueError, match="already registered"):
            stripe.register_kind(kind)
        model = nn.Sequential(nn.Conv2d(3, 4, 1), MyGate(4)).double()
        data = _batches(1, 3)
        r = record_stripes(model, data)
        x = model[0](data[0][0])
        torch.testing.assert_close(torch.tensor(r.layer("1").gate.mean, dtype=torch.float64),
                                   torch.sigmoid(x.mean((2, 3))).mean(0))
    finally:
        assert stripe.unregister_kind(kind.name) is kind
    assert "MyGate" not in attention_kinds()


def test_cli_reads_training_checkpoint(tmp_path, capsys) -> None:
    """A `foldattn train` checkpoint: the model is rebuilt from its config, the data defaults to its own."""
    from foldattn import train
    from foldattn.train import checkpoint as ckpt
    cfg = train.TrainConfig(model="cifar_resnet20", attention="se", dataset="digits")
    torch.manual_seed(0)
    model = create_model("cifar_resnet20", num_classes=10, attention="se")
    path = ckpt.save_checkpoint(tmp_path / "best.pt", model=model, config=cfg.to_dict(), run={"classes": 10})
    assert main(["stripe", str(path), "--max-images", "16", "--samples", "0", "-o", str(tmp_path / "s")]) == 0
    r = StripeResult.load(tmp_path / "s" / "stripes.json")
    assert r.meta["data"] == "digits" and len(r.layers) == 9
    model.eval()
    first = r.layer("layer1.0.attention").gate.mean
    ref = record_stripes(model, [next(iter(_digits_val()))[0][:16]], layers=["layer1.0.attention"]).layers[0]
    torch.testing.assert_close(torch.tensor(first), torch.tensor(ref.gate.mean), rtol=1e-5, atol=1e-6)


def _digits_val():
    import argparse

    from foldattn.cli.stripe import load_data

    return load_data(argparse.Namespace(data="digits", data_dir=None, val_split=None, batch_size=128, seed=0)).val


def test_stripe_and_calibrate_data_use_the_recorded_preprocessing() -> None:
    import argparse

    from foldattn.cli.stripe import load_data

    args = argparse.Namespace(batch_size=8, data="digits", data_dir=None, val_split=None, seed=0)
    recorded = {"mean": [0.4914, 0.4822, 0.4465], "std": [0.2023, 0.1994, 0.2010], "size": [16, 16]}
    data = load_data(args, {"dataset": "digits", "cache_dir": "/should/not/be/written"}, recorded)
    loader = data.val
    torch.testing.assert_close(loader.mean.flatten(), torch.tensor(recorded["mean"]))
    torch.testing.assert_close(loader.std.flatten(), torch.tensor(recorded["std"]))


def test_kept_samples_follow_the_images_seen_not_max_samples() -> None:
    """A huge max_samples allocates nothing up front (it was two lists of that length per layer: 14.6 GB for
    --samples 100000000): only the images recorded are kept."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = record_stripes(_tiny(), _batches(2, 4), max_samples=10**9)
    assert result.num_images == 8 and all(len(x.gate_sample) == 8 for x in result.layers)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 1 << 19  # KiB: under 512 MiB


def test_cli_samples_above_max_images_are_clamped_with_a_note(tmp_path, capsys) -> None:
    rc = main(["stripe", "cifar_resnet20", "--attention", "se", "--dataset", "digits", "--max-images", "8",
               "--samples", "1000", "--batch-size", "8", "-o", str(tmp_path / "s")])
    assert rc == 0
    err = capsys.readouterr().err
    assert "note: --samples 1000 is more than --max-images 8: keeping 8" in err
    saved = json.loads((tmp_path / "s" / "stripes.json").read_text())
    assert all(len(x["gate_sample"]) == 8 for x in saved["layers"])


def test_cli_stripe_unknown_heatmap_layer_is_one_line_and_writes_nothing(tmp_path, capsys) -> None:
    out = tmp_path / "o"
    rc = main(["stripe", "cifar_resnet20", "--attention", "se", "--max-images", "8", "--samples", "4",
               "--batch-size", "8", "--heatmap-layers", "nope", "layer1.0.attention", "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "--heatmap-layers nope: not a recorded layer; recorded: layer1.0.attention" in err
    assert "Traceback" not in err and not out.exists()
