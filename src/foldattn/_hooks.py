"""Running a module's hooks around another forward: the one place foldattn reads torch's private hook state.

ASR computes its host's output with scaled parameters (:func:`foldattn.hosts.scaled_forward`) without
calling ``host.forward``, yet the host's forward pre-hooks, forward hooks and backward hooks (its own
and the global ones) must run as ``host(*args)`` would run them: monitoring, FSDP, quantization
observers rely on them. PyTorch has no public API to run a module's hooks around a given function, so
:func:`call_with_hooks` follows ``nn.Module._call_impl`` with the module's hook dictionaries. Everything
private it touches is in this file, and ``tests/test_hooks.py`` compares it, hook kind by hook kind,
with ``nn.Module.__call__``: a torch upgrade that changes the machinery breaks that test, not a user.

The same private state is read when :func:`foldattn.fold` replaces a module: :func:`hook_kinds` lists a
module's hooks, :func:`carry_hooks` moves them onto the replacement where :func:`carry_problem` finds
that exact, and :func:`hook_memo` / :func:`rebind_hooks` keep the user's hook objects through deep copies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn
from torch.nn.modules import module as _m
from torch.utils.hooks import BackwardHook

__all__ = ["call_with_hooks", "has_hooks", "hook_kinds", "carry_problem", "carry_hooks", "hook_memo", "rebind_hooks"]


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


# --------------------------------------------------------------------------------------
# Hooks of modules that fold replaces: which kinds a module holds, carrying them to the
# replacement, and keeping the user's hook objects themselves (not copies) in a deep copy
# --------------------------------------------------------------------------------------

#: every kind of hook a module holds, and the dictionary torch keeps it in
HOOK_ATTRS: dict[str, str] = {
    "forward-pre": "_forward_pre_hooks",
    "forward": "_forward_hooks",
    "backward": "_backward_hooks",
    "backward-pre": "_backward_pre_hooks",
    "state-dict-pre": "_state_dict_pre_hooks",
    "state-dict": "_state_dict_hooks",
    "load-state-dict-pre": "_load_state_dict_pre_hooks",
    "load-state-dict-post": "_load_state_dict_post_hooks",
}
#: the kinds that run around a call of the module (the others run around its state_dict)
CALL_KINDS = frozenset({"forward-pre", "forward", "backward", "backward-pre"})
LEGACY_BACKWARD = "legacy backward (register_backward_hook)"


def hook_kinds(module: nn.Module) -> list[str]:
    """The kinds of hook registered on ``module`` itself (not its children, not the global ones)."""
    kinds = []
    for kind, attr in HOOK_ATTRS.items():
        if getattr(module, attr, None):
            legacy = kind == "backward" and getattr(module, "_is_full_backward_hook", None) is False
            kinds.append(LEGACY_BACKWARD if legacy else kind)
    return kinds


def carry_problem(src: nn.Module, dst: nn.Module | None) -> str | None:
    """Why ``src``'s hooks cannot be moved onto ``dst`` (which replaces it; None: a new module without
    hooks) exactly, or None.

    Exact means: each hook sees the same tensors (inputs, outputs, gradients) in the same order as
    when ``src`` ran around ``dst``'s computation. State-dict hooks are never exact (the replacement's
    state_dict has other keys), nor are legacy backward hooks (they see the last operation's gradients,
    which fold changes). Call hooks of both modules interleave exactly only in some combinations.
    """
    own = hook_kinds(src)
    for kind in own:
        if kind == LEGACY_BACKWARD:
            return f"a {kind} hook, whose gradients depend on its last operation (use register_full_backward_hook)"
        if kind not in CALL_KINDS:
            return f"a {kind} hook, which would see the replacement's state_dict with other keys"
    theirs = set(hook_kinds(dst)) & (CALL_KINDS | {LEGACY_BACKWARD}) if dst is not None else set()
    listed = "/".join(sorted(theirs))
    if theirs and {"backward", "backward-pre"} & set(own):
        return f"a backward hook, and its replacement {type(dst).__name__} has {listed} hooks of its own"
    if "forward" in own and theirs & {"forward-pre", "backward", "backward-pre", LEGACY_BACKWARD}:
        return (f"a forward hook, and its replacement {type(dst).__name__} has {listed} hooks of its own that "
                "would change what it sees")
    return None


def carry_hooks(src: nn.Module, dst: nn.Module) -> None:
    """Register ``src``'s call hooks on ``dst``, in the order they ran around ``dst``'s own (the caller
    checked :func:`carry_problem`): ``src``'s pre-hooks before ``dst``'s, its forward hooks after."""
    pre = list(src._forward_pre_hooks.items())
    for hook_id, hook in reversed(pre):  # prepended one by one: the first ends up first
        dst.register_forward_pre_hook(hook, prepend=True, with_kwargs=hook_id in src._forward_pre_hooks_with_kwargs)
    for hook_id, hook in src._forward_hooks.items():
        dst.register_forward_hook(hook, with_kwargs=hook_id in src._forward_hooks_with_kwargs,
                                  always_call=hook_id in src._forward_hooks_always_called)
    for hook in reversed(list(src._backward_pre_hooks.values())):
        dst.register_full_backward_pre_hook(hook, prepend=True)
    for hook in src._backward_hooks.values():
        dst.register_full_backward_hook(hook)


def _kept(hook: Any) -> bool:
    """Whether a deep copy should keep ``hook`` itself: not when it is bound to a module (a module's own
    method, torch's ``_WrappedHook``), which the copy must rebind to its own copy of that module."""
    return not isinstance(getattr(hook, "__self__", None), nn.Module) and not isinstance(hook, _m._WrappedHook)


def hook_memo(model: nn.Module) -> dict[int, Any]:
    """A ``copy.deepcopy`` memo that keeps the user's hook objects: a hook that is a bound method of a
    recorder, a ``functools.partial`` over a list or a callable object is shared by the copy, so what it
    records still reaches its owner (a plain deep copy would record into a copy of the recorder)."""
    memo: dict[int, Any] = {}
    for m in model.modules():
        for attr in HOOK_ATTRS.values():
            for hook in getattr(m, attr, {}).values():
                if _kept(hook):
                    memo[id(hook)] = hook
    return memo


def rebind_hooks(original: nn.Module, copy: nn.Module) -> list[nn.Module]:
    """Put ``original``'s hook objects back into its deep ``copy`` (module by module, by name), where
    a deep copy made elsewhere copied them; returns the modules of ``original`` whose hooks the copy holds."""
    copied = dict(copy.named_modules())
    done = []
    for name, m in original.named_modules():
        twin = copied.get(name)
        if twin is None or not hook_kinds(m):
            continue
        complete = True
        for attr in HOOK_ATTRS.values():
            ours, theirs = getattr(m, attr, None), getattr(twin, attr, None)
            if not ours:
                continue
            if theirs is None or list(ours) != list(theirs):
                complete = False
                continue
            for hook_id, hook in ours.items():
                if _kept(hook):
                    theirs[hook_id] = hook
        if complete:
            done.append(m)
    return done
