"""ASR runs its host functionally and never mutates it: threads, hooks, parametrizations,
BatchNorm bookkeeping, torch.compile and FSDP2 all see a normal module."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import foldattn
from foldattn import ASR, attention, create_model, fold, verify
from foldattn.hosts import has_scaled_forward, scaled_forward

from .conftest import randomize_norms, randomize_psi

ZOO = attention.names()


def _v(layer: ASR) -> torch.Tensor:
    return layer.vector().detach()


def _host_params(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters()}


# --- threads ---------------------------------------------------------------------------------


@pytest.mark.parametrize("att", ZOO)
def test_four_threads_running_one_model_match_a_single_thread(att: str) -> None:
    model = randomize_psi(randomize_norms(create_model("cifar_resnet20", attention=att, asr=True))).eval()
    params = _host_params(model)
    xs = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    with torch.no_grad():
        expected = [model(x) for x in xs]
    results: dict[int, list[torch.Tensor]] = {i: [] for i in range(4)}
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def work(i: int) -> None:
        try:
            start.wait()
            with torch.no_grad():
                for _ in range(6):
                    results[i].append(model(xs[i]))
        except BaseException as e:  # reported below; a thread's exception would be lost otherwise
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(4):
        for out in results[i]:
            torch.testing.assert_close(out, expected[i], rtol=0, atol=0)
    after = _host_params(model)
    assert after.keys() == params.keys()
    for name, p in after.items():
        assert type(p) is nn.Parameter and p is params[name], name  # the same Parameter objects, never replaced


def test_a_backward_thread_beside_an_inference_thread() -> None:
    model = randomize_psi(create_model("cifar_resnet20", attention="se", asr=True)).eval()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    nn.functional.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        expected = model(x[:2])
    model.zero_grad()
    stop, errors, outs = threading.Event(), [], []

    def infer() -> None:
        try:
            while not stop.is_set():
                with torch.no_grad():
                    outs.append(model(x[:2]))
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=infer)
    t.start()
    for _ in range(3):
        nn.functional.cross_entropy(model(x), y).backward()
    stop.set()
    t.join()
    assert not errors and outs
    for out in outs:
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for n, p in model.named_parameters():  # three backward passes accumulated the same gradient three times
        torch.testing.assert_close(p.grad, 3 * grads[n], msg=n)


# --- hooks -----------------------------------------------------------------------------------


@pytest.mark.parametrize("host_name", ["batchnorm2d", "conv2d", "linear"])
def test_hooks_on_the_host_see_its_true_parameters(host_name: str) -> None:
    host = {"batchnorm2d": nn.BatchNorm2d(6), "conv2d": nn.Conv2d(3, 6, 3), "linear": nn.Linear(5, 6)}[host_name]
    x = torch.randn(2, 5) if host_name == "linear" else torch.randn(2, 6 if host_name == "batchnorm2d" else 3, 5, 5)
    layer = randomize_psi(ASR(host, "se"))
    true_weight = host.weight.detach().clone()
    seen: dict[str, Any] = {}

    def pre(module: nn.Module, args: tuple[Any, ...]) -> None:
        seen["pre_weight"] = module.weight.detach().clone()
        seen["pre_type"] = type(module.weight)
        seen["pre_state"] = {k: v.clone() for k, v in module.state_dict().items()}

    def post(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: torch.Tensor) -> None:
        seen["post_weight"] = module.weight.detach().clone()
        seen["post_state_weight"] = module.state_dict()["weight"].clone()
        seen["out"] = out.detach().clone()

    host.register_forward_pre_hook(pre)
    host.register_forward_hook(post, with_kwargs=True)
    out = layer(x)
    assert seen["pre_type"] is nn.Parameter
    for key in ("pre_weight", "post_weight", "post_state_weight"):
        assert torch.equal(seen[key], true_weight), key
    assert torch.equal(seen["pre_state"]["weight"], true_weight)
    assert torch.equal(seen["out"], out.detach())  # the forward hook receives the host's (scaled) output


def test_hooks_can_change_inputs_and_outputs_and_backward_hooks_run() -> None:
    host = nn.Linear(4, 6)
    layer = ASR(host, "se")
    x = torch.randn(3, 4)
    plain, doubled = layer(x).detach(), layer(x * 2).detach()
    h1 = host.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    torch.testing.assert_close(layer(x).detach(), doubled)  # the pre-hook's new input is used
    h1.remove()
    h2 = host.register_forward_hook(lambda m, args, out: out + 1)
    torch.testing.assert_close(layer(x).detach(), plain + 1)
    h2.remove()
    grads: list[torch.Tensor] = []
    host.register_full_backward_hook(lambda m, gin, gout: grads.append(gout[0]))
    layer(x.requires_grad_()).sum().backward()
    assert len(grads) == 1 and torch.equal(grads[0], torch.ones(3, 6))


def test_global_forward_hooks_see_the_host_once() -> None:
    layer = ASR(nn.BatchNorm2d(4), "se").eval()
    calls: list[str] = []
    handle = nn.modules.module.register_module_forward_hook(lambda m, a, o: calls.append(type(m).__name__))
    try:
        layer(torch.randn(1, 4, 3, 3))
    finally:
        handle.remove()
    assert calls.count("BatchNorm2d") == 1 and calls.count("ASR") == 1


# --- BatchNorm bookkeeping -----------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("cls", [nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm])
def test_batchnorm_statistics_follow_the_module_exactly(cls: type, momentum: float | None, track: bool) -> None:
    bn = cls(6, momentum=momentum, track_running_stats=track)
    layer = randomize_psi(ASR(copy.deepcopy(bn), "se"))
    shape = (4, 6) if cls is nn.BatchNorm1d else (4, 6, 3, 3)
    for step in range(4):  # training steps update the running statistics the module's way
        x = torch.randn(shape) * (step + 1) + step
        out = layer(x)
        ref = bn(x) * _v(layer).reshape(1, -1, *([1] * (len(shape) - 2)))
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    if track:
        torch.testing.assert_close(layer.host.running_mean, bn.running_mean)
        torch.testing.assert_close(layer.host.running_var, bn.running_var)
        assert int(layer.host.num_batches_tracked) == int(bn.num_batches_tracked) == 4
    else:
        assert layer.host.running_mean is None
    layer.eval()
    bn.eval()
    x = torch.randn(shape)
    ref = bn(x) * _v(layer).reshape(1, -1, *([1] * (len(shape) - 2)))
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-6)


def test_instance_norm_unbatched_input() -> None:
    host = nn.InstanceNorm1d(5, affine=True)
    layer = randomize_psi(ASR(host, "se"))
    x = torch.randn(5, 7)  # (C, L): no batch dim
    torch.testing.assert_close(layer(x), host(x) * _v(layer).reshape(-1, 1))


def test_conv_padding_modes_groups_and_dilation() -> None:
    for mode in ("zeros", "reflect", "replicate", "circular"):
        host = nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2, padding_mode=mode)
        layer = randomize_psi(ASR(host, "se"))
        x = torch.randn(2, 4, 7, 7)
        torch.testing.assert_close(layer(x), host(x) * _v(layer).reshape(1, -1, 1, 1), msg=mode)


def test_subclass_with_its_own_forward_is_not_run_as_the_base_layer() -> None:
    class BNThenTanh(nn.BatchNorm2d):  # a forward that does more than BatchNorm2d's
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x).tanh()

    host = BNThenTanh(4)
    assert not has_scaled_forward(host)  # falls back to functional_call, which runs this forward
    layer = randomize_psi(ASR(host, "se")).eval()
    x = torch.randn(2, 4, 3, 3)
    scaled = copy.deepcopy(host)
    with torch.no_grad():
        scaled.weight.mul_(_v(layer))
        scaled.bias.mul_(_v(layer))
    torch.testing.assert_close(layer(x), scaled(x))


def test_timm_batchnorm_act_runs_functionally() -> None:
    timm = pytest.importorskip("timm")
    host = timm.layers.BatchNormAct2d(6, act_layer=nn.SiLU)
    assert has_scaled_forward(host)
    layer = randomize_psi(ASR(host, "se"))
    x = torch.randn(3, 6, 4, 4)
    ref = copy.deepcopy(host)
    v = _v(layer)
    with torch.no_grad():
        ref.weight.mul_(v)
        ref.bias.mul_(v)
    torch.testing.assert_close(layer(x), ref(x))  # BN with the scaled affine, then SiLU (training mode)
    assert torch.equal(layer.host.running_mean, ref.running_mean)


def test_scaled_forward_never_assigns_to_the_host() -> None:
    host = nn.Conv2d(3, 4, 3)

    class Spy(nn.Conv2d):
        def __setattr__(self, name: str, value: Any) -> None:
            if getattr(self, "_armed", False):
                raise AssertionError(f"assigned {name}")
            super().__setattr__(name, value)

    spy = Spy(3, 4, 3)
    spy.load_state_dict(host.state_dict())
    object.__setattr__(spy, "_armed", True)
    v = torch.rand(4) + 0.5
    out = scaled_forward(spy, v, torch.randn(1, 3, 5, 5))
    assert out.shape == (1, 4, 3, 3)


# --- parametrized hosts ------------------------------------------------------------------------


def _parametrized(kind: str, host_name: str) -> nn.Module:
    host = nn.Conv2d(3, 6, 3) if host_name == "conv" else nn.Linear(5, 6)
    return parametrizations.weight_norm(host) if kind == "weight_norm" else parametrizations.spectral_norm(host)


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm"])
@pytest.mark.parametrize("host_name", ["conv", "linear"])
def test_parametrized_hosts_train_and_fold_exactly(kind: str, host_name: str) -> None:
    host = _parametrized(kind, host_name)
    x = torch.randn(4, 3, 6, 6) if host_name == "conv" else torch.randn(4, 5)
    model = nn.Sequential(randomize_psi(ASR(host, "se")), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    model(x)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 0])).backward()
    opt.step()
    moved = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert any("original" in n for n in moved) and any("attention" in n for n in moved), moved
    # the training form is the parametrized host's output times v
    model.eval()
    layer = model[0]
    ref = layer.host(x) * _v(layer).reshape(1, -1, *([1] * (x.dim() - 2)))
    torch.testing.assert_close(layer(x), ref)
    # fold: a plain host (no parametrization), exact in float64
    model64 = copy.deepcopy(model).double()
    deployed = fold(model64)
    assert not parametrize.is_parametrized(deployed[0])
    assert type(deployed[0]) is (nn.Conv2d if host_name == "conv" else nn.Linear)
    assert type(deployed[0].weight) is nn.Parameter
    verify(model64, deployed, x.double())  # float64: 1e-10 relative
    assert parametrize.is_parametrized(model[0].host)  # the model itself keeps its parametrization


# --- torch.compile, FSDP2 ---------------------------------------------------------------------------


@pytest.mark.slow
def test_compiled_model_trains_one_step_with_the_eager_loss() -> None:
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), ASR(nn.BatchNorm2d(8), "se"), nn.ReLU(),
                          nn.Conv2d(8, 8, 3), ASR(nn.GroupNorm(2, 8), "dia"), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), ASR(nn.Linear(8, 4), "eca"))
    randomize_psi(eager)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model)
    x, y = torch.randn(6, 3, 10, 10), torch.randint(0, 4, (6,))
    losses = []
    for model, run in ((eager, eager), (compiled_model, compiled)):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loss = nn.functional.cross_entropy(run(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # inductor reorders float32 reductions: 1e-5 relative on the loss and the updated weights
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    for (n, a), b in zip(eager.state_dict().items(), compiled_model.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=n)
    assert foldattn.fold(compiled) is not None  # the compiled wrapper unwraps and folds


@pytest.mark.slow
def test_fsdp2_fully_shard_trains_asr_like_one_process(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).with_name("fsdp_worker.py")), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = torch.load(tmp_path / "fsdp.pt", weights_only=True)
    ref = results["reference"]
    for how in ("root", "asr", "host"):
        got = results[how]
        assert got.keys() == ref.keys()
        for k in ref:  # FSDP averages the two half-batch gradients: the full-batch step, to float round-off
            torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6, msg=f"{how}: {k}")
        assert results[how + "_param_types"] == ["DTensor"]
