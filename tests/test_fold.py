"""Model-level fold: copies, modes, idempotence, strict load into the plain backbone, BN fusion."""

from __future__ import annotations

import functools
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import foldattn
from foldattn import ASR, attention, create_model, fold, srp
from foldattn.fold import HookNotCarriedError, asr_layers, conv_bn_pairs
from foldattn.summary import count_params

from .conftest import randomize_norms, randomize_psi

X = torch.randn(2, 3, 16, 16)


def _trained_like(name: str = "cifar_resnet20", **kw: object) -> nn.Module:
    model = create_model(name, **kw)
    return randomize_psi(randomize_norms(model))


@pytest.mark.parametrize("att", attention.names())
@pytest.mark.parametrize("both", [False, True])
def test_fold_cifar_resnet_float64(att: str, both: bool) -> None:
    if both and not attention.get(att).has_classic_form:
        pytest.skip(f"{att} has no classic form, so no ASR(X) + X")
    model = _trained_like(attention=att, asr=True, both=both).double()
    deployed = fold(model)
    assert not asr_layers(deployed)
    assert foldattn.verify(model, deployed, X.double()).max_rel <= 1e-10
    plain = create_model("cifar_resnet20", attention=att if both else None).double()
    plain.load_state_dict(deployed.state_dict(), strict=True)
    assert count_params(deployed) == count_params(plain)
    assert foldattn.verify(model, plain, X.double()).max_rel <= 1e-10


@pytest.mark.parametrize("att", attention.names())
def test_fold_cifar_resnet_float32_after_training_steps(att: str) -> None:
    model = create_model("cifar_resnet20", attention=att, asr=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    for _ in range(2):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert foldattn.verify(model, fold(model), x).max_rel <= 1e-5


def test_fold_returns_a_copy_and_keeps_modes() -> None:
    model = _trained_like(attention="se", asr=True).train()
    deployed = fold(model)
    assert deployed is not model and asr_layers(model)
    assert model.training and all(m.training for m in model.modules())
    assert deployed.training  # the caller's mode, kept


def test_fold_inplace() -> None:
    model = _trained_like(attention="se", asr=True).eval()
    ref = model(X)
    out = fold(model, inplace=True)
    assert out is model and not asr_layers(model)
    torch.testing.assert_close(model(X), ref, rtol=1e-5, atol=1e-6)


def test_fold_is_idempotent() -> None:
    model = _trained_like(attention="eca", asr=True).eval()
    once = fold(model)
    with pytest.warns(UserWarning, match="no ASR layer"):
        twice = fold(once)
    for (k, a), (_, b) in zip(once.state_dict().items(), twice.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_fold_without_asr_warns_and_returns_unchanged() -> None:
    model = create_model("cifar_resnet20")
    with pytest.warns(UserWarning, match="no ASR layer; returned unchanged"):
        out = fold(model, inplace=True)
    assert out is model


def _assert_plain_tree(deployed: nn.Module, model: nn.Module) -> None:
    assert isinstance(deployed, type(model)) and not asr_layers(deployed)
    assert not [k for k in deployed.state_dict() if k.startswith(("module.", "_orig_mod."))]
    create_model("cifar_resnet20").load_state_dict(deployed.state_dict(), strict=True)


def test_fold_unwraps_data_parallel_and_compile_wrappers() -> None:
    model = _trained_like(attention="se", asr=True).eval()
    _assert_plain_tree(fold(nn.DataParallel(model)), model)
    compiled = torch.compile(model)  # wrapping only (nothing is compiled until it runs)
    assert hasattr(compiled, "_orig_mod")
    _assert_plain_tree(fold(compiled), model)
    _assert_plain_tree(fold(torch.compile(nn.DataParallel(model))), model)  # nested wrappers


def test_fold_unwraps_distributed_data_parallel(tmp_path: Path) -> None:
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    model = _trained_like(attention="se", asr=True).eval()
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        assert next(iter(ddp.state_dict())).startswith("module.")
        deployed = fold(ddp)
    finally:
        dist.destroy_process_group()
    _assert_plain_tree(deployed, model)
    assert foldattn.verify(model, deployed, X).max_rel <= 1e-5


_HOOKS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks", "_backward_hooks",
          "_backward_pre_hooks")


@pytest.mark.parametrize(
    "name,kw,fuse_bn",
    [
        ("cifar_resnet20", {"attention": "se", "asr": True}, False),
        ("cifar_resnet20", {"attention": "dia", "asr": True, "both": True}, False),
        ("cifar_resnet20", {"attention": "srm", "asr": True}, True),
        ("cifar_resnet20_dbb", {"attention": "eca", "asr": True}, False),
    ],
)
def test_fold_leaves_no_hooks_or_parametrizations(name: str, kw: dict[str, object], fuse_bn: bool) -> None:
    model = _trained_like(name, **kw)
    model(X).sum().backward()  # a training step's forward and backward first
    deployed = fold(model, fuse_bn=fuse_bn)
    for n, m in deployed.named_modules():
        for attr in _HOOKS:
            assert not getattr(m, attr), f"{n or 'model'}.{attr}"
        assert not parametrize.is_parametrized(m), n
    for n, p in deployed.named_parameters():
        assert not p._backward_hooks and not getattr(p, "_post_accumulate_grad_hooks", None), n


def test_fold_names_the_layer_with_nan() -> None:
    model = _trained_like(attention="se", asr=True)
    with torch.no_grad():
        model.layer2[1].bn2.attention.psi.fill_(float("inf"))
    with pytest.raises(ValueError, match=r"cannot fold ASR layer 'layer2.1.bn2': psi contains NaN or Inf"):
        fold(model)


def test_fold_nan_from_attention_weights() -> None:
    model = _trained_like(attention="se", asr=True)
    with torch.no_grad():
        model.layer1[0].bn2.attention.fc1.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="layer1.0.bn2.*vector contains NaN"):
        fold(model)


def test_fold_rejects_non_modules() -> None:
    with pytest.raises(TypeError, match="expects an nn.Module"):
        fold("model")  # type: ignore[arg-type]


def test_root_asr_layer_folds() -> None:
    layer = ASR(nn.BatchNorm2d(3), "se")
    assert isinstance(fold(layer), nn.BatchNorm2d)


@pytest.mark.parametrize("name", ["cifar_resnet20", "cifar_resnet164"])
def test_fuse_bn_removes_every_batchnorm(name: str) -> None:
    model = _trained_like(name, attention="se", asr=True).double().eval()
    deployed = fold(model, fuse_bn=True)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in deployed.modules())
    assert foldattn.verify(model, deployed, X[:1].double()).max_rel <= 1e-10


def test_fuse_bn_float32() -> None:
    model = _trained_like(attention="srm", asr=True).eval()
    assert foldattn.verify(model, fold(model, fuse_bn=True), X).max_rel <= 1e-5


def test_conv_bn_pairs_skip_a_conv_used_twice_and_untraceable_models() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.bn = nn.BatchNorm2d(3)
            self.seq = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn(self.conv(x))
            return self.seq(self.conv(y))

    assert conv_bn_pairs(Twice()) == [("seq.0", "seq.1")]

    class Branchy(Twice):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent: fx cannot trace this
                x = self.bn(self.conv(x))
            return self.seq(x)

    assert conv_bn_pairs(Branchy()) == [("seq.0", "seq.1")]
    model = randomize_norms(Branchy()).eval()
    x = torch.rand(1, 3, 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        foldattn.verify(model, fold(model, fuse_bn=True), x)


# --- hooks: carried exactly where fold replaces a module, refused where it cannot be ------------------------------

def _hooked_net(seed: int = 0) -> nn.Sequential:
    """conv -> ASR(BatchNorm2d) -> ReLU -> conv, float64, with non-trivial statistics and psi."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), ASR(nn.BatchNorm2d(4), "se"), nn.ReLU(), nn.Conv2d(4, 2, 1))
    return randomize_psi(randomize_norms(net)).double().eval()


def _tensors(rest: tuple[object, ...]) -> list[torch.Tensor]:
    return [t.detach().clone() for t in torch.utils._pytree.tree_leaves(rest) if isinstance(t, torch.Tensor)]


def _logger(log: list[object], tag: str) -> object:
    def hook(module: nn.Module, *rest: object) -> None:
        log.append((tag, _tensors(rest)))
    return hook


# (id, how to register the hook on a module; every one logs the tensors it sees)
CARRIED = {
    "forward": lambda m, log: m.register_forward_hook(_logger(log, "fwd")),
    "forward-kwargs": lambda m, log: m.register_forward_hook(_logger(log, "fwd-kw"), with_kwargs=True),
    "forward-always-call": lambda m, log: m.register_forward_hook(_logger(log, "fwd-always"), always_call=True),
    "forward-pre": lambda m, log: m.register_forward_pre_hook(_logger(log, "pre")),
    "forward-pre-kwargs": lambda m, log: m.register_forward_pre_hook(_logger(log, "pre-kw"), with_kwargs=True),
    "full-backward": lambda m, log: m.register_full_backward_hook(_logger(log, "bwd")),
    "full-backward-pre": lambda m, log: m.register_full_backward_pre_hook(_logger(log, "bwd-pre")),
}


def _run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        xi = x.clone().requires_grad_(True)
        model(xi).square().sum().backward()
    return xi.grad


def _same_log(a: list[object], b: list[object]) -> None:
    assert [t for t, _ in a] == [t for t, _ in b] and a, (a, b)
    for (_, ta), (_, tb) in zip(a, b, strict=True):
        assert len(ta) == len(tb)
        for u, v in zip(ta, tb, strict=True):
            assert u.shape == v.shape and torch.allclose(u, v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("on", ["asr", "host"])
@pytest.mark.parametrize("kind", list(CARRIED))
def test_fold_carries_hooks_of_the_asr_layer_and_its_host(kind: str, on: str) -> None:
    net = _hooked_net()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    before: list[object] = []
    handle = CARRIED[kind](net[1] if on == "asr" else net[1].host, before)
    grad = _run(net, x)
    deployed = fold(net)
    assert isinstance(deployed[1], nn.BatchNorm2d)
    after: list[object] = []
    before_copy = list(before)
    before.clear()
    # the folded model calls the same hook object: what it logs lands in the same list
    grad_deployed = _run(deployed, x)
    after = list(before)
    _same_log(before_copy, after)  # the same tensors, in the same order
    assert torch.allclose(grad, grad_deployed, rtol=1e-10)
    handle.remove()


def test_fold_keeps_hook_order_of_asr_and_host() -> None:
    net = _hooked_net()
    log: list[object] = []
    net[1].register_forward_pre_hook(_logger(log, "asr-pre"))
    net[1].host.register_forward_pre_hook(_logger(log, "host-pre"))
    net[1].host.register_forward_hook(_logger(log, "host-fwd"))
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        net(x)
    before, log[:] = list(log), []
    with torch.no_grad():
        fold(net)(x)
    assert [t for t, _ in before] == ["asr-pre", "host-pre", "host-fwd"]  # the ASR layer's pre-hook stays first
    _same_log(before, log)


class _Recorder:
    """A stateful hook object: a plain deep copy would record into a copy of it."""

    def __init__(self) -> None:
        self.calls = 0

    def hook(self, module: nn.Module, args: object, out: object) -> None:
        self.calls += 1


def test_fold_keeps_the_users_hook_objects_not_copies() -> None:
    net = _hooked_net()
    rec, part = _Recorder(), []
    net[1].host.register_forward_hook(rec.hook)
    net[3].register_forward_hook(functools.partial(lambda log, m, a, o: log.append(1), part))
    deployed = fold(net)
    with torch.no_grad():
        deployed(torch.randn(1, 3, 4, 4, dtype=torch.float64))
    assert rec.calls == 1 and part == [1]


# (id, how to register, the text of the refusal)
REFUSED = {
    "legacy-backward": (lambda m: m.register_backward_hook(lambda *a: None), "a legacy backward"),
    "state-dict": (lambda m: m._register_state_dict_hook(lambda *a: None), "a state-dict hook"),
    "state-dict-pre": (lambda m: m.register_state_dict_pre_hook(lambda *a: None), "a state-dict-pre hook"),
    "load-state-dict-pre": (lambda m: m.register_load_state_dict_pre_hook(lambda *a: None),
                            "a load-state-dict-pre hook"),
    "load-state-dict-post": (lambda m: m.register_load_state_dict_post_hook(lambda *a: None),
                             "a load-state-dict-post hook"),
}


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("kind", list(REFUSED))
def test_fold_refuses_hooks_it_cannot_carry(kind: str, inplace: bool) -> None:
    net = _hooked_net()
    register, text = REFUSED[kind]
    register(net[1])
    with pytest.raises(HookNotCarriedError,
                       match=rf"^fold: 1 \(ASR\) has {text}.*replaces the ASR layer.*handle.remove\(\)"):
        fold(net, inplace=inplace)
    assert isinstance(net[1], ASR)  # refused before anything changed, in place too


@pytest.mark.parametrize("where", ["attention", "psi-owner-child", "block-branch"])
def test_fold_refuses_a_hook_on_a_part_it_deletes(where: str) -> None:
    if where == "block-branch":
        net = nn.Sequential(srp.create("repvgg", 3, 3)).eval()
        target, name = next(m for n, m in net[0].named_modules() if n), "0."
    else:
        net = _hooked_net()
        inner = [m for n, m in net[1].attention.named_modules()]
        target = inner[0] if where == "attention" else inner[-1]
        name = "1.attention"
    target.register_forward_hook(lambda *a: None)
    with pytest.raises(HookNotCarriedError, match=rf"fold: {re.escape(name)}.*a forward hook.*deletes it"):
        fold(net)


def test_fold_carries_a_rep_block_hook_to_its_conv() -> None:
    torch.manual_seed(0)
    net = randomize_norms(nn.Sequential(srp.create("repvgg", 3, 3), nn.ReLU())).double().eval()
    log: list[object] = []
    net[0].register_forward_hook(_logger(log, "fwd"))
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        net(x)
    before, log[:] = list(log), []
    deployed = fold(net)
    assert isinstance(deployed[0], nn.Conv2d)
    with torch.no_grad():
        deployed(x)
    _same_log(before, log)


@pytest.mark.parametrize(("asr_hook", "host_hook", "refused"), [
    ("full-backward", "forward", "a backward hook, and its replacement BatchNorm2d has forward hooks"),
    ("forward", "forward-pre", "a forward hook, and its replacement BatchNorm2d has forward-pre hooks"),
    ("forward", "full-backward", "a forward hook, and its replacement BatchNorm2d has backward hooks"),
    ("forward-pre", "full-backward", None),  # pre-hooks run first either way: exact
    ("forward", "forward", None),
])
def test_fold_hooks_on_both_asr_and_host(asr_hook: str, host_hook: str, refused: str | None) -> None:
    net = _hooked_net()
    log: list[object] = []
    CARRIED[asr_hook](net[1], log)
    CARRIED[host_hook](net[1].host, log)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    if refused:
        with pytest.raises(HookNotCarriedError, match=re.escape(refused)):
            fold(net)
        return
    _run(net, x)
    before, log[:] = list(log), []
    _run(fold(net), x)
    _same_log(before, log)


def test_fuse_bn_leaves_a_hooked_norm_and_its_hook_runs() -> None:
    net = _hooked_net()
    log: list[object] = []
    net[1].host.register_forward_hook(_logger(log, "fwd"))  # the host of an ASR layer
    with pytest.warns(UserWarning, match="left 1"):
        deployed, report = fold(net, fuse_bn=True, return_report=True)
    assert [x.norm for x in report.left] == ["1"] and "hook" in report.left[0].reason
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        net(x)
        deployed(x)
    _same_log(log[:1], log[1:])
    assert foldattn.verify(net, deployed, x).max_rel <= 1e-10


class _TwoBranches(nn.Module):
    """bn(conv3x3(x)) + bn(conv1x1(x)): merged into one conv by fuse_bn."""

    def __init__(self) -> None:
        super().__init__()
        self.k3, self.b3 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.k1, self.b1 = nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b3(self.k3(x)) + self.b1(self.k1(x))


def test_fuse_bn_refuses_a_hook_on_a_merged_branch_and_carries_the_roots() -> None:
    net = randomize_norms(_TwoBranches()).double().eval()
    log: list[object] = []
    net.register_forward_hook(_logger(log, "root"))
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    deployed = fold(net, fuse_bn=True)
    assert isinstance(deployed, torch.fx.GraphModule)  # the root was replaced, its hook carried
    with torch.no_grad():
        net(x)
        deployed(x)
    _same_log(log[:1], log[1:])
    net.k1.register_forward_hook(lambda *a: None)
    with pytest.raises(HookNotCarriedError, match=r"fold: k1 \(Conv2d\) has a forward hook.*merged or deleted"):
        fold(net, fuse_bn=True)


def test_example_inputs_need_fuse_bn() -> None:
    with pytest.raises(ValueError, match="example_inputs only serve fuse_bn=True"):
        fold(_hooked_net(), example_inputs=torch.randn(1, 3, 4, 4))


@pytest.mark.parametrize("on", ["layer", "scale"])
def test_fold_refuses_a_hook_where_a_scale_layer_folds(on: str) -> None:
    from foldattn.models.vit import LayerScale

    net = nn.Sequential(nn.Linear(4, 4), LayerScale(4, 0.5))
    (net[0] if on == "layer" else net[1]).register_forward_hook(lambda *a: None)
    text = r"fold: 0 \(Linear\).*folded the scale layer 1 into its output" if on == "layer" else \
        r"fold: 1 \(LayerScale\).*merged or deleted that module"
    with pytest.raises(HookNotCarriedError, match=text):
        fold(net)
    assert isinstance(fold(nn.Sequential(nn.Linear(4, 4), LayerScale(4, 0.5)))[1], nn.Identity)  # without hooks
