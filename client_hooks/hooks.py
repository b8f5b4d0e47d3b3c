"""Which modules to watch, and the hooks that exist only during a capture step.

`Hooks.attach()` registers forward (and pre-forward) hooks on the activation targets and a
forward hook on the watched model itself (the end of its forward); `detach()` removes every
one of them. For plain PyTorch the end of backward is found by a tensor hook on each of the
model's output tensors its forward made, put there at the end of each capture step's forward
(one Python call in backward, on the autograd thread); where that cannot work (a compiled
model, a loss on none of the outputs) by a post-accumulate-grad hook on every trainable
parameter (`use_param_hooks`).
Either queues an engine callback, which reads the gradients after the other callbacks of
that backward (DDP's finalize: the averaged gradients; `_backward_done`).
Between capture steps the model carries no tensortap hook. Once torch's compiler is
imported (torch.compile, or a torch.optim optimizer), each hook checks whether dynamo traces
it (`Hooks.untrace`). Traced into a compiled forward, a forward hook only hands its value
over (`Traced`): no graph break, no statistic in the graph, and the model stays one compiled
graph. A compiled model calls the hooks it was compiled with at every step and ignores hooks
added later, so once one has handed a value over the hooks stay registered (the engine's
`_drain`), and a model watched compiled (`compiled_inside`) gets them at once. Module paths
are the model's own: torch.compile's `_orig_mod` step is left out (`named_modules`).
"""
from __future__ import annotations

import difflib
import functools
import sys
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

Targets = Union[None, str, Sequence[str]]


def _own_params(m: nn.Module, keep: frozenset = frozenset()) -> list[nn.Parameter]:
    """m's own trainable parameters; `keep`: ids of those counted trainable though frozen now."""
    return [p for p in m.parameters(recurse=False) if p.requires_grad or id(p) in keep]


def _path(name: str) -> str:
    """A module path as the model's code names it: without the `_orig_mod` step that
    torch.compile's wrapper (OptimizedModule) adds to the paths of the modules inside it."""
    return ".".join([p for p in name.split(".") if p != "_orig_mod"]) if "_orig_mod" in name else name


def named_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """model.named_modules(), the paths without torch.compile's `_orig_mod` step (`_path`)."""
    return [(_path(n), m) for n, m in model.named_modules()]


def _unwrapped(model: nn.Module) -> nn.Module:
    """The module that torch.compile wrapped, for a compiled model; else the model."""
    inner = getattr(model, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else model


def leaf_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in named_modules(model) if n and not any(True for _ in m.children())]


def submodule(model: nn.Module, path: str, option: str) -> nn.Module:
    """model.get_submodule(path), or a one-line ValueError that names the option, the path and
    the closest module path there is (else the first ones): a typo in a layer name is found
    when the model is watched, before training."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in named_modules(model) if n]
        close = difflib.get_close_matches(path, names, n=1, cutoff=0.8)
        hint = (f"did you mean {close[0]!r}?" if close else
                f"its modules start with {', '.join(map(repr, names[:5]))}" if names else "it has no submodules")
        raise ValueError(f"tensortap: {option}: {type(model).__name__} has no submodule {path!r}; {hint}") from None


def activation_targets(model: nn.Module, names: Targets, all_leaves: bool) -> list[tuple[str, nn.Module]]:
    """None: the model's direct children; a list of module paths; all_leaves: every leaf."""
    if all_leaves:
        return leaf_modules(model) or [("model", model)]
    if names is None:
        return list(_unwrapped(model).named_children()) or [("model", model)]
    if isinstance(names, str):
        names = [names]
    return [(n, submodule(model, n, "activations")) for n in names]


def gradient_layers(model: nn.Module, spec: Targets, all_leaves: bool,
                    keep: frozenset = frozenset()) -> list[tuple[str, list[nn.Parameter]]]:
    """Layers whose gradients are summarised, as (module path, its trainable parameters).

    None: the first and last modules owning parameters (in registration order) of the model;
    a submodule path: the same inside that submodule (paths stay relative to the model);
    "all" (or all_leaves): every module owning parameters; a list: those modules (recursive).
    keep: ids of parameters counted trainable though frozen now (trainable at an earlier watch)."""
    if spec == "all" or (spec is None and all_leaves):
        return [(n or "model", ps) for n, m in named_modules(model) if (ps := _own_params(m, keep))]
    if spec is None or isinstance(spec, str):
        root = model if spec is None else submodule(model, spec, "gradients")
        prefix = "" if spec is None else spec + "."
        owners = [(prefix + n if n else spec or "model", ps)
                  for n, m in named_modules(root) if (ps := _own_params(m, keep))]
        return owners[:1] + owners[-1:] if len(owners) > 1 else owners
    out = []
    for n in spec:
        ps = [p for p in submodule(model, n, "gradients").parameters() if p.requires_grad or id(p) in keep]
        out.append((n, ps))
    return [(n, ps) for n, ps in out if ps]


OnTensor = Callable[[str, object], None]


def compiler_loaded() -> bool:
    """Whether torch's compiler is imported, which torch.compile needs (so does making a
    torch.optim optimizer: it imports it too). Importing it costs ~1 s, so tensortap never
    does it itself."""
    return "torch._dynamo" in sys.modules


def compiled_inside(model: nn.Module) -> bool:
    """Whether `model` or a module in it is torch.compile'd (torch.compile's wrapper, whose
    `_orig_mod` is the module it compiles, or Module.compile()). Its compiled code will keep
    the hooks it is first compiled with."""
    return any(isinstance(getattr(m, "_orig_mod", None), nn.Module) or
               getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())


def _call(fn, *args, **kwargs):
    return fn(*args, **kwargs)


def tracing_guard() -> tuple:
    """(compiling, off), or (None, None) on a torch without them: compiling() is True only
    while dynamo traces (`torch.compiler.is_dynamo_compiling`, 0.06 us a call in eager code);
    off(fn, *args) calls fn(*args) through `torch.compiler.disable`, so that a compiled
    function which reaches it breaks its graph there and runs fn as it is."""
    compiler = getattr(torch, "compiler", None)
    disable = getattr(compiler, "disable", None)
    compiling = getattr(compiler, "is_dynamo_compiling", None) or getattr(compiler, "is_compiling", None)
    if disable is None or compiling is None:
        return None, None
    return compiling, disable(_call)


class Slot:
    """Where one hook (or one record() name) of a compiled forward leaves its value: the last
    call's, as an eager forward's capture keeps the last (a hook's value under no_grad apart,
    see `put`). Traced code only stores into it (no read, so nothing to guard on)."""

    def __init__(self, owner: "Traced", name: str, how: int):
        self.owner, self.name, self.how, self.pair = owner, name, how, None
        self.grad = self.nograd = None

    def put(self, value) -> None:
        """Traced (inlined into the compiled code); the stores replayed at each call. A
        hook's value is kept apart by the grad mode of its forward: an evaluation forward
        under no_grad does not replace a training forward's value (Engine.on_output)."""
        if self.how != Traced.HOOK or torch.is_grad_enabled():
            self.grad = value
        else:
            self.nograd = value
        self.owner.full = True


class Traced:
    """What a compiled forward hands to tensortap. A hook (or `record`) traced by dynamo does
    not compute its statistics in the graph, nor break it: while `live` (a capture step) it
    stores its value into its own `Slot` (an attribute store that the compiled code replays
    at each call) and sets `full`; the engine takes the values in eager code
    (Engine._drain). Why not a graph break: dynamo cannot resume after a break inside a hook
    in a loop (an nn.Sequential) and runs that frame eagerly from then on, on every later
    step too (torch 2.11: the whole model; 2.13: leaf by leaf). Why not a list that grows:
    dynamo guards on a list's length, so a compiled model called again before the values
    were taken (a rollout, micro-batches, an evaluation loop with always=True) compiled
    anew at each call, up to the recompile limit. Stores are not guarded on: dynamo guards
    on `live` (and the grad mode), so a capture step and a plain one each have their
    variant, chosen at each call; a record() name met for the first time adds its slot
    (one recompilation)."""

    HOOK, RECORD, ALWAYS = 0, 1, 2  # how: a forward hook's value; record(); record(always=True)

    def __init__(self):
        self.live = False
        self.full = False  # a slot holds a value not yet taken
        self.slots: list[Slot] = []  # the hooks' slots and the records', in the order made
        self.named: dict = {}  # (name, always) -> the Slot of record(name, ..., always)

    def slot(self, name: str, how: int) -> Slot:
        """A hook's slot (made in eager code, with the hook)."""
        s = Slot(self, name, how)
        self.slots.append(s)
        return s

    def record(self, name: str, value, pair, always: bool) -> None:
        """record(name, value, pair, always) in a compiled forward (traced): its value into
        the slot of that name, made at the first call."""
        s = self.named.get((name, always))
        if s is None:
            s = self.named[(name, always)] = Slot(self, name, Traced.ALWAYS if always else Traced.RECORD)
            self.slots.append(s)
        s.pair = pair
        s.put(value)

    def drop_hooks(self) -> None:
        """Forget the hooks' slots (their hooks are gone: a model watched anew)."""
        self.slots = [s for s in self.slots if s.how != Traced.HOOK]

    def take(self) -> list:
        """(name, value, pair, how, grad) of each value handed over since the last take, a
        slot's grad-mode value before its no_grad one; the slots emptied."""
        items = []
        self.full = False
        for s in self.slots:
            if s.grad is not None:
                items.append((s.name, s.grad, s.pair, s.how, True))
                s.grad = None
            if s.nograd is not None:
                items.append((s.name, s.nograd, s.pair, s.how, False))
                s.nograd = None
        return items


def untraced(fn):
    """`fn`, kept out of torch.compile's tracing: a compiled function that reaches it (a
    log_loss() inside it) breaks its graph there and calls it as it is, so tensortap's code is
    never compiled into the model's graph, guarded on, or made to raise a compiler error into
    training. Only while dynamo traces does the call go through `torch.compiler.disable`,
    whose wrapper costs ~1 us a call even outside a compiled region (this VM): see
    `tracing_guard`. Used once `compiler_loaded()` (Engine.begin_step) for the entry points
    that a forward rarely calls; the hooks and record() hand their values over instead
    (`Traced`)."""
    compiling, off = tracing_guard()
    if off is None:
        return fn

    def call(*args, **kwargs):
        if compiling():
            return off(fn, *args, **kwargs)
        return fn(*args, **kwargs)
    return functools.wraps(fn)(call)


class Hooks:
    """Registered only around capture steps (kept from one capture step to the next when
    they follow each other, and for good once a compiled forward has handed a value over: see
    Traced). No error reaches the model's forward or backward: the forward hooks catch
    on_output's (and hand them to on_error), the other callbacks catch their own."""

    def __init__(self, act_targets: list[tuple[str, nn.Module]], inputs: bool,
                 on_output: OnTensor, params: Optional[list[nn.Parameter]] = None,
                 on_grads_ready: Optional[Callable[[], None]] = None,
                 root: Optional[nn.Module] = None, on_forward_done: Optional[Callable[[], None]] = None,
                 on_error: Optional[Callable[[BaseException], None]] = None, traced: Optional[Traced] = None):
        """on_output(name, value) may raise: the hook hands the error to on_error (the
        others catch their own). traced: where the hooks hand their values over when dynamo
        traces them (see Traced; the engine shares it with record)."""
        self._targets, self._inputs = act_targets, inputs
        self._root = root
        self._on_output = on_output
        self._on_error = on_error or (lambda e: None)
        self._params = params or []
        self._on_grads_ready = on_grads_ready
        self._on_forward_done = on_forward_done
        self._handles: list = []
        self._seen = 0
        self._queued = self._requeued = False
        self.fired = 0  # forward hooks run in this capture step (none: a compiled model, see Engine)
        # set by `untrace`: each hook then checks compiling() first (see tracing_guard)
        self._compiling: Optional[Callable[[], bool]] = None
        self._off: Optional[Callable] = None
        self.traced = traced if traced is not None else Traced()
        # made once, the same objects registered at every attach
        self._fwd_hooks = [self._fwd(path) for path, _ in act_targets]
        self._pre_hooks = [self._pre(path) for path, _ in act_targets] if inputs else []
        self._done_hook, self._grad_hook, self._out_hook = self._done, self._grad, self._out_grad
        self.untraced = False
        # the end of backward from a hook on the model's output (see the module docstring);
        # False: from the parameters' hooks. out_hooked: this step's output got the hook
        self.via_output = on_grads_ready is not None
        self.out_hooked = False

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> None:
        for i, (_, mod) in enumerate(self._targets):
            self._handles.append(mod.register_forward_hook(self._fwd_hooks[i]))
            if self._inputs:
                self._handles.append(mod.register_forward_pre_hook(self._pre_hooks[i]))
        if self._root is not None and self._on_forward_done is not None:
            # after the targets' hooks when the root is one of them
            self._handles.append(self._root.register_forward_hook(self._done_hook))
        if self._on_grads_ready is not None:
            self._seen, self._queued, self._requeued = 0, False, False
            if not self.via_output:
                self._attach_param_hooks()

    def _attach_param_hooks(self) -> None:
        for p in self._params:
            self._handles.append(p.register_post_accumulate_grad_hook(self._grad_hook))

    def use_param_hooks(self) -> None:
        """From now on the end of backward comes from the parameters' hooks (registered at
        once when the hooks are attached): the output's hook did not show it (a compiled
        model, whose forward hooks dynamo traces; an output that the loss does not use)."""
        if not self.via_output:
            return
        self.via_output = False
        if self._handles and self._on_grads_ready is not None:
            self._attach_param_hooks()

    def untrace(self) -> None:
        """From now on every hook checks `compiling()` first. While dynamo traces, a forward
        hook hands its value to `traced` (no graph break, see Traced), the end-of-forward hook
        does nothing (the engine takes the values later), and a gradient hook (compiled
        autograd) calls itself through `off` (a graph break; see tracing_guard). In eager code
        that is one call of ~0.06 us, not a wrapper's frame: these hooks run ~40 times a
        capture step."""
        if self.untraced:
            return
        self.untraced = True
        self._compiling, self._off = tracing_guard()

    def new_step(self) -> None:
        """Forget a backward whose end was never seen (one that raised): each step starts clean."""
        self._seen, self._queued, self._requeued, self.fired, self.out_hooked = 0, False, False, 0, False

    def deliver(self, name: str, value) -> None:
        """A value a compiled forward handed over (Traced.HOOK), taken in eager code: counted
        and handed on as the hook itself does in an eager forward."""
        self.fired += 1
        try:
            self._on_output(name, value)
        except Exception as e:
            self._on_error(e)

    def silent(self) -> bool:
        """Activation hooks were attached for this capture step and none of them ran (a value
        handed over by a compiled forward counts once taken: the engine adds it to `fired`)."""
        return bool(self._fwd_hooks or self._pre_hooks) and self.fired == 0

    def detach(self) -> None:
        handles, self._handles = self._handles, []
        for h in handles:
            h.remove()

    def _fwd(self, path: str):
        name = f"{path}:output"
        slot = self.traced.slot(name, Traced.HOOK)  # where a compiled forward leaves its value

        def hook(module, args, output):
            c = self._compiling
            if c is not None and c():  # in a compiled forward: handed over, nothing computed
                if self.traced.live:
                    slot.put(output)
                return None
            self.fired += 1
            try:
                self._on_output(name, output)
            except Exception as e:
                self._on_error(e)
        return hook

    def _pre(self, path: str):
        name = f"{path}:input"
        slot = self.traced.slot(name, Traced.HOOK)

        def hook(module, args):
            c = self._compiling
            if c is not None and c():
                if self.traced.live:
                    slot.put(args[0] if len(args) == 1 else args)
                return None
            self.fired += 1
            try:
                self._on_output(name, args[0] if len(args) == 1 else args)
            except Exception as e:
                self._on_error(e)
        return hook

    def _done(self, module, args, output) -> None:
        """The watched model's forward has ended (on_forward_done catches its own errors)."""
        c = self._compiling
        if c is not None and c():  # a compiled forward: the engine takes its values later
            return None
        self._on_forward_done()
        if self.via_output:
            self._hook_output(output)

    def _hook_output(self, output) -> None:
        """The hook that finds the end of backward, on each of the model's output tensors that
        requires grad (none in a no_grad forward: no backward to find). Each of a dict's or
        tuple's: the loss may use any of them (a side head's output first, the loss on the
        second, found no backward when only the first was hooked); the first to get its
        gradient queues the end, once."""
        if type(output) is not torch.Tensor:
            if isinstance(output, dict):
                output = list(output.values())
            if not isinstance(output, (tuple, list)):
                return
            # (a leaf, a parameter the model returns: a hook on it would stay for good, one more
            # each capture step; only tensors its forward made)
            outs = [t for t in output if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        elif output.grad_fn is not None:
            outs = [output]
        else:
            return
        try:
            for t in outs:
                t.register_hook(self._out_hook)
                self.out_hooked = True
        except Exception:  # (a tensor that takes no hook): the parameters' hooks
            self.use_param_hooks()

    def _out_grad(self, grad) -> None:
        """Backward has reached the model's output: queue `_backward_done` for its end."""
        if not self._queued and not self._queue_end():
            self.use_param_hooks()  # no engine callback: the parameters' hooks from the next step

    def _queue_end(self) -> bool:
        """Queue `_backward_done` to run once this backward has ended; False where the
        autograd engine takes no callback here."""
        try:
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_done)
        except Exception:
            return False
        self._queued = True
        return True

    def _grad(self, p: torch.Tensor) -> None:
        """Runs in backward as each parameter's gradient lands (autograd thread on CUDA). The
        first one queues `_backward_done` to run once this backward has ended: a parameter
        that gets no gradient (unused in the loss) cannot hide the end. Each backward queues
        its own (gradient accumulation: the last one wins)."""
        c = self._compiling
        if c is not None and c():
            return self._off(self._grad, p)
        if self._queued or self._queue_end():
            return
        self._seen += 1  # no engine callback here: count the parameters instead
        if self._seen == len(self._params):
            self._seen = 0
            self._on_grads_ready()

    def _backward_done(self) -> None:
        """The engine's callback at the end of backward. The first call queues itself once
        more and returns, so that the gradients are read after the callbacks that others
        queued during backward: DDP queues its finalize (the averaged gradients written to
        `.grad`, and on CUDA the stream made to wait for the all-reduce that writes them)
        when its last bucket is ready, after this hook queued ours at the start of backward.
        Read before it, the gradients were each rank's own, not those the optimizer steps
        with (and a Lightning fit of the same run, which reads them later, disagreed)."""
        if not self._requeued:
            self._requeued = True
            if self._queue_end():
                return  # (else no more callbacks taken here: read now)
        self._requeued = self._queued = False
        self._on_grads_ready()
