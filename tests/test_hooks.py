"""foldattn._hooks.call_with_hooks against nn.Module.__call__, hook kind by hook kind.

The one function that reads torch's private hook state: if a torch upgrade changes how modules run
their hooks, these comparisons fail here instead of ASR layers silently skipping a user's hooks.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from foldattn._hooks import (
    LEGACY_BACKWARD,
    call_with_hooks,
    carry_hooks,
    carry_problem,
    hook_kinds,
    hook_memo,
    rebind_hooks,
)


def _record(log: list[Any], tag: str, ret: Callable[..., Any] | None = None) -> Callable[..., Any]:
    def hook(module: nn.Module, *rest: Any) -> Any:
        shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                  for t in torch.utils._pytree.tree_leaves(rest)]
        log.append((tag, type(module).__name__, shapes))
        return ret(*rest) if ret is not None else None

    return hook


# (id, how to register a hook of that kind on a module and globally; the hook may change values)
KINDS: dict[str, Callable[[nn.Module, list[Any]], list[Any]]] = {
    "forward-pre": lambda m, log: [m.register_forward_pre_hook(_record(log, "pre"))],
    "forward-pre-changes-input": lambda m, log: [m.register_forward_pre_hook(
        _record(log, "pre", lambda args: (args[0] * 2,)))],
    "forward-pre-kwargs": lambda m, log: [m.register_forward_pre_hook(
        _record(log, "pre-kw", lambda args, kwargs: ((args[0] + 1,), kwargs)), with_kwargs=True)],
    "forward": lambda m, log: [m.register_forward_hook(_record(log, "fwd"))],
    "forward-changes-output": lambda m, log: [m.register_forward_hook(_record(log, "fwd", lambda a, o: o * 3))],
    "forward-kwargs": lambda m, log: [m.register_forward_hook(_record(log, "fwd-kw"), with_kwargs=True)],
    "full-backward": lambda m, log: [m.register_full_backward_hook(_record(log, "bwd"))],
    "full-backward-pre": lambda m, log: [m.register_full_backward_pre_hook(_record(log, "bwd-pre"))],
    "legacy-backward": lambda m, log: [m.register_backward_hook(_record(log, "bwd-legacy"))],
    "global-forward-pre": lambda m, log: [nn.modules.module.register_module_forward_pre_hook(_record(log, "gpre"))],
    "global-forward": lambda m, log: [nn.modules.module.register_module_forward_hook(_record(log, "gfwd"))],
    "global-backward": lambda m, log: [nn.modules.module.register_module_full_backward_hook(_record(log, "gbwd"))],
    "all-at-once": lambda m, log: [h for k in ("forward-pre", "forward-kwargs", "full-backward", "global-forward")
                                   for h in KINDS[k](m, log)],
}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("make", [lambda: nn.Linear(4, 3), lambda: nn.Conv2d(2, 3, 3)], ids=["linear", "conv"])
def test_call_with_hooks_runs_hooks_as_module_call_does(kind: str, make: Callable[[], nn.Module]) -> None:
    torch.manual_seed(0)
    a = make()
    b = make()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 4) if isinstance(a, nn.Linear) else torch.randn(2, 2, 5, 5)
    results = []
    for module, call in ((a, lambda m, x: m(x)), (b, lambda m, x: call_with_hooks(m, m.forward, (x,), {}))):
        log: list[Any] = []
        handles = KINDS[kind](module, log)
        try:
            xi = x.clone().requires_grad_(True)
            out = call(module, xi)
            out.sum().backward()
        finally:
            for h in handles:
                h.remove()
        results.append((log, out.detach(), xi.grad, module.weight.grad))
    (log_a, out_a, gx_a, gw_a), (log_b, out_b, gx_b, gw_b) = results
    assert log_a == log_b  # the same hooks, in the same order, with the same arguments
    assert torch.equal(out_a, out_b) and torch.equal(gx_a, gx_b) and torch.equal(gw_a, gw_b)


def test_no_hooks_is_the_plain_forward() -> None:
    m = nn.Linear(3, 2)
    x = torch.randn(1, 3)
    seen = []
    assert torch.equal(call_with_hooks(m, lambda t: seen.append(1) or m.forward(t), (x,), {}), m(x)) and seen == [1]


# --- the helpers fold uses to carry a replaced module's hooks ---------------------------------------------------

class _Wrap(nn.Module):
    """A module that only calls another: its hooks, moved onto the inner one, must see the same."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


@pytest.mark.parametrize("kind", [k for k in KINDS if not k.startswith(("global", "legacy", "all-at-once"))])
def test_carry_hooks_runs_them_as_the_replaced_module_did(kind: str) -> None:
    torch.manual_seed(0)
    inner = nn.Linear(4, 3)
    wrap, bare = _Wrap(inner), copy.deepcopy(inner)
    log: list[Any] = []
    handles = KINDS[kind](wrap, log)
    x = torch.randn(2, 4)

    def run(module: nn.Module) -> tuple[Any, ...]:
        start = len(log)
        xi = x.clone().requires_grad_(True)
        out = module(xi)
        out.sum().backward()
        return [(tag, shapes) for tag, _, shapes in log[start:]], out.detach(), xi.grad

    log_a, out_a, gx_a = run(wrap)
    assert carry_problem(wrap, bare) is None
    carry_hooks(wrap, bare)
    for h in handles:
        h.remove()  # only the carried copies run now
    log_b, out_b, gx_b = run(bare)
    assert log_a == log_b and log_a  # the same hooks, in the same order, with the same tensors
    assert torch.equal(out_a, out_b) and torch.equal(gx_a, gx_b)


# (id, registration, the kind hook_kinds reports, whether carry_problem refuses it)
REGISTER = [
    ("forward-pre", lambda m: m.register_forward_pre_hook(lambda *a: None), "forward-pre", False),
    ("forward", lambda m: m.register_forward_hook(lambda *a: None), "forward", False),
    ("full-backward", lambda m: m.register_full_backward_hook(lambda *a: None), "backward", False),
    ("backward-pre", lambda m: m.register_full_backward_pre_hook(lambda *a: None), "backward-pre", False),
    ("legacy-backward", lambda m: m.register_backward_hook(lambda *a: None), LEGACY_BACKWARD, True),
    ("state-dict-pre", lambda m: m.register_state_dict_pre_hook(lambda *a: None), "state-dict-pre", True),
    ("state-dict", lambda m: m._register_state_dict_hook(lambda *a: None), "state-dict", True),
    ("load-pre", lambda m: m.register_load_state_dict_pre_hook(lambda *a: None), "load-state-dict-pre", True),
    ("load-post", lambda m: m.register_load_state_dict_post_hook(lambda *a: None), "load-state-dict-post", True),
]


@pytest.mark.parametrize(("register", "kind", "refused"), [r[1:] for r in REGISTER], ids=[r[0] for r in REGISTER])
def test_hook_kinds_and_which_are_carried(register: Callable[[nn.Module], Any], kind: str, refused: bool) -> None:
    m = nn.Linear(2, 2)
    assert hook_kinds(m) == []
    register(m)
    assert hook_kinds(m) == [kind]
    problem = carry_problem(m, nn.Linear(2, 2))
    assert (problem is not None) == refused
    if refused:
        assert kind in problem


def test_a_deep_copy_with_hook_memo_shares_the_hook_objects() -> None:
    calls: list[int] = []

    class Counter:
        def hook(self, module: nn.Module, args: Any, out: Any) -> None:
            calls.append(1)

    m = nn.Sequential(nn.Linear(2, 2))
    counter = Counter()
    m[0].register_forward_hook(counter.hook)
    m[0].register_load_state_dict_post_hook(m[0].register_forward_hook)  # a module's own method: rebound
    twin = copy.deepcopy(m, hook_memo(m))
    assert next(iter(twin[0]._forward_hooks.values())).__self__ is counter
    assert next(iter(twin[0]._load_state_dict_post_hooks.values())).__self__ is twin[0]
    plain = copy.deepcopy(m)
    assert next(iter(plain[0]._forward_hooks.values())).__self__ is not counter  # what fold no longer does
    other = copy.deepcopy(m)
    assert rebind_hooks(m, other) == [m[0]]
    assert next(iter(other[0]._forward_hooks.values())).__self__ is counter
