"""Running a module's hooks around another forward: the one place foldattn reads torch's private hook state.

ASR computes its host's output with scaled parameters (:func:`foldattn.hosts.scaled_forward`) without
calling ``host.forward``, yet the host's forward pre-hooks, forward hooks and backward hooks (its own
and the global ones) must run as ``host(*args)`` would run them: monitoring, FSDP, quantization
observers rely on them. PyTorch has no public API to run a module's hooks around a given function, so
:func:`call_with_hooks` follows ``nn.Module._call_impl`` with the module's hook dictionaries. Everything
private it touches is in this file, and ``tests/test_hooks.py`` compares it, hook kind by hook kind,
with ``nn.Module.__call__``: a torch upgrade that changes the machinery breaks that test, not a user.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn
from torch.nn.modules import module as _m
from torch.utils.hooks import BackwardHook

__all__ = ["call_with_hooks", "has_hooks"]


def has_hooks(module: nn.Module) -> bool:
    """Whether ``module(...)`` would run any hook (its own or a global one)."""
    return bool(module._forward_pre_hooks or module._forward_hooks or module._backward_hooks
                or module._backward_pre_hooks or _m._global_forward_pre_hooks or _m._global_forward_hooks
                or _m._global_backward_hooks or _m._global_backward_pre_hooks)


def call_with_hooks(host: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                     kwargs: dict[str, Any]) -> Any:
    """``forward(*args, **kwargs)`` wrapped in the host's (and the global) forward hooks, as
    ``host(*args, **kwargs)`` would wrap ``host.forward``."""
    if not has_hooks(host):
        return forward(*args, **kwargs)
    pre = (*_m._global_forward_pre_hooks.items(), *host._forward_pre_hooks.items())
    post = (*_m._global_forward_hooks.items(), *host._forward_hooks.items())
    has_backward = bool(host._backward_hooks or host._backward_pre_hooks or _m._global_backward_hooks
                        or _m._global_backward_pre_hooks)
    for hook_id, hook in pre:
        if hook_id in host._forward_pre_hooks_with_kwargs:
            result = hook(host, args, kwargs)
            if result is not None:
                if not (isinstance(result, tuple) and len(result) == 2):
                    raise RuntimeError(f"forward pre-hook must return None or a tuple (new_args, new_kwargs), "
                                       f"but got {result}.")
                args, kwargs = result
        else:
            result = hook(host, args)
            if result is not None:
                args = result if isinstance(result, tuple) else (result,)
    full, non_full = host._get_backward_hooks() if has_backward else ([], [])
    backward_pre = host._get_backward_pre_hooks() if has_backward else []
    bw_hook = BackwardHook(host, full, backward_pre) if full or backward_pre else None
    if bw_hook is not None:
        args = bw_hook.setup_input_hook(args)
    out = forward(*args, **kwargs)
    for hook_id, hook in post:
        if hook_id in host._forward_hooks_with_kwargs or hook_id in _m._global_forward_hooks_with_kwargs:
            result = hook(host, args, kwargs, out)
        else:
            result = hook(host, args, out)
        if result is not None:
            out = result
    if bw_hook is not None:
        out = bw_hook.setup_output_hook(out)
    if non_full and isinstance(out, Tensor) and out.grad_fn is not None:
        for hook in non_full:
            out.grad_fn.register_hook(_m._WrappedHook(hook, host))
    return out
