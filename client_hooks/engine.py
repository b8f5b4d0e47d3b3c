"""The capture engine behind both front doors (Tap, TapCallback); exists only when gated on.

Step life cycle (training thread):
    begin_step -> [forward hooks, record(), log_batch()] -> grads_ready -> end_step
A capture step (cadence: first `first_n` batches of every epoch, and every `every_n_steps`-th
step) attaches hooks at begin_step and removes them at end_step, where the step's vectors go
to the host in one copy. Every public method swallows its errors: one warning per kind. A
torch.compile'd forward hands its hooks' (and record()'s) values over instead of running them
(hooks.Traced: a slot per hook and record name): they are taken at the end of backward or of
the step (`_drain`), and the hooks of such a model stay registered between capture steps.

On CUDA with Triton (client_hooks.fused) a capture step costs, on the training thread: one
grouped kernel launch for the real tensors met during the forward (their block partials); at
the end of backward one grouped launch for the values deferred since the forward (a complex
value or declared pair recorded after the model's forward: ~4 kernels before it, five rows
in the launch), one foreach copy of the watched gradients and weights into a flat buffer and
one launch over it (client_hooks.flat); after the optimizer step one foreach subtraction and
one launch for the update; then one merge launch and one device-to-host copy. The step's
tensor and gradient statistics go to the sender as one packed record (collector.packed): the
collector, not this process, turns the values into payloads, takes the layers' weight and
update norms, update ratios and the total gradient norm. A loss (`metrics`) logged
before the capture step ends is one more value of its copy; otherwise it is one copy to a
pinned slot and one event a step.

Grouping the forward's tensors means reading them later than their hook: an in-place change
in between (an `inplace=True` ReLU after a Linear) would alter them. So each value (kind,
name) is first launched at once, in its hook, and its version counter compared at the next
launch point (the end of the model's forward, the end of backward, the end of the step). A
value found unchanged is deferred into the group from the next capture on; a changed one
stays launched at once. A deferred value that is found changed after all (the model's
behaviour changed) cannot be read: its record is dropped and counted by the sender, a warning
says why, and it is launched at once from then on. Deferred tensors are held until the group
launches: at most `defer_cap` bytes (1 GiB, or 1/64 of a smaller GPU's memory), beyond which
the group launches early. Those autograd saves for backward cost nothing more; the others
(e.g. an output that feeds only an addition) raise the forward's peak memory on capture steps
(bench/capture_memory.py: 516 MiB for the demo FNO at batch 64, under the 1 GiB cap).
"""
from __future__ import annotations

import contextlib
import functools
import math
import operator
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from client_hooks import flat as _flat
from client_hooks import hooks as _hooks
from client_hooks import stats
from client_hooks.capture import Capture, FlushMemo, Span, scalar_to_host
from client_hooks.fields import MAX_DEPTH, MAX_FIELDS, leaf as _leaf, walk


@dataclass
class Options:
    """Capture options shared by Tap and TapCallback (see Tap's docstring)."""
    first_n: int = 1
    every_n_steps: Optional[int] = None
    activations: Any = None
    inputs: bool = False
    gradients: Any = None
    all_leaves: bool = False
    pairs: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.first_n < 0 or (self.every_n_steps is not None and self.every_n_steps < 1):
            raise ValueError("tensortap: first_n must be >= 0 and every_n_steps >= 1 or None")
        for name, spec in self.pairs.items():
            kind = spec if isinstance(spec, str) else spec[0]
            if kind not in stats.PAIR_KINDS:
                raise ValueError(f"tensortap: pairs[{name!r}] must be one of {stats.PAIR_KINDS}")


_warned: set[str] = set()


def warn_once(kind: str, err: BaseException) -> None:
    say_once(kind, f"tensortap: {kind} telemetry failed ({err!r}); training goes on, "
                   f"further {kind} errors are not reported")


def session_failed(err: BaseException) -> None:
    """Telemetry could not start (Tap's first use, TapCallback's set-up): training goes on
    without it. A setting that is wrong (session.SetupError) is told as it is, in one line."""
    from client_hooks.session import SetupError

    if isinstance(err, SetupError):
        say_once("session", f"tensortap: {err}; training goes on without telemetry")
    else:
        warn_once("session", err)


def _activations_failed(err: BaseException) -> None:
    """A forward hook's error (Hooks catches it: no wrapper's frame on each hook call)."""
    warn_once("activations", err)


_OWN = (os.path.dirname(os.path.abspath(__file__)) + os.sep, os.path.dirname(torch.__file__) + os.sep)


def _user_level() -> int:
    """warnings.warn's stacklevel from say_once to the first frame outside tensortap and
    torch: the user's line that led to the warning (a fixed level named tensortap's own
    wrappers, or torch's hook dispatch, for a call through them)."""
    f, level = sys._getframe(2), 2
    while f is not None and f.f_code.co_filename.startswith(_OWN):
        f, level = f.f_back, level + 1
    return level if f is not None else 2


def say_once(key: str, message: str) -> None:
    if key in _warned:
        return
    _warned.add(key)
    try:
        warnings.warn(message, RuntimeWarning, stacklevel=_user_level())
    except Exception:  # a warnings filter set to "error" must not reach training either
        pass


class BadInput(ValueError):
    """An argument tensortap cannot record: said once per `key` (one line), the call
    ignored; unlike an internal failure, it does not silence that kind's later errors."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def guarded(kind: str):
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*a, **kw):
            try:
                return fn(*a, **kw)
            except BadInput as e:
                say_once(f"input {e.key}", f"tensortap: {e}; the call is ignored")
                return None
            except Exception as e:  # telemetry never raises into the training loop
                warn_once(kind, e)
                return None
        return inner
    return wrap


NAME_MAX = 256  # a record's name on the wire (collector.wire.Name): 1..256 characters
_REQUIRES_GRAD = operator.attrgetter("requires_grad")  # (mapped in C: no Python frame a parameter)


def bad_name(call: str, name) -> bool:
    """Whether `name` cannot be a record's name (not text, empty, over NAME_MAX characters),
    said once per call and name. The collector refuses such a record with its whole frame,
    which holds many others: the client drops it alone."""
    if isinstance(name, str) and 0 < len(name) <= NAME_MAX:  # (a StrEnum member too)
        return False
    shown = repr(name) if len(repr(name)) <= 60 else repr(name)[:57] + "..."
    say_once(f"name {call} {shown}", f"tensortap: {call}({shown}): a name must be text of 1 to "
             f"{NAME_MAX} characters; it is not recorded")
    return True


def _kind_of(t: torch.Tensor) -> str:
    """What a tensor tensortap does not measure is, for a warning: "sparse_coo", "quantized"..."""
    return "quantized" if t.is_quantized else str(t.layout).removeprefix("torch.")


SPARSE_DENSE_MAX = 256 << 20  # bytes: a sparse gradient up to this is measured as its dense values


def _grads(params) -> list[torch.Tensor]:
    """The gradients of `params` that are there; a sparse one (nn.Embedding(sparse=True)) as
    its dense values, whose statistics are then a dense one's (`_dense_grad`)."""
    return [x for p in params if (g := p.grad) is not None
            and (x := g if g.layout is torch.strided else _dense_grad(g)) is not None]


def _dense_grad(g: torch.Tensor) -> Optional[torch.Tensor]:
    """A sparse gradient's dense values (its statistics then are a dense one's), or None past
    SPARSE_DENSE_MAX (a huge embedding table's: a copy that size each capture), said once."""
    nbytes = g.numel() * g.element_size()
    if nbytes <= SPARSE_DENSE_MAX:
        return g.to_dense()
    say_once("sparse gradient", f"tensortap: a sparse gradient of {g.numel()} elements ({nbytes >> 20} MiB "
             "dense) is not measured, nor counted in the total norm; the other layers are")
    return None


def whole(v, what: str) -> Optional[int]:
    """A step or epoch as an int: Python, NumPy or 0-d tensor integers, and floats of whole
    value (3.0); None stays None. Anything else is a BadInput (the wire holds integers)."""
    if v is None or type(v) is int:
        return v
    # training thread: Python or NumPy numbers, or a 0-d CPU tensor in practice (a CUDA one
    # would wait for its device here, once per call, not per statistic)
    try:
        return operator.index(v)
    except TypeError:
        pass
    try:
        f = float(v)
    except (TypeError, ValueError):
        f = math.nan
    if math.isfinite(f) and f.is_integer():
        return int(f)
    raise BadInput(what, f"{what} must be a whole number, got {v!r}")


def metric_value(name: str, v):
    """A metric's value: a one-element real tensor (kept), or a Python or NumPy real number
    as float."""
    if isinstance(v, torch.Tensor):
        if v.numel() == 1 and not v.is_complex():
            return v
        got = "a complex tensor" if v.is_complex() else f"a tensor of {v.numel()} elements"
    else:
        leaf = _leaf(v)
        if isinstance(leaf, torch.Tensor) and leaf.numel() == 1:  # a one-element NumPy array
            return float(leaf.reshape(()).real)  # training thread; NumPy: host memory, no device wait
        if leaf is not None and not isinstance(leaf, torch.Tensor):
            return float(leaf)
        got = type(v).__name__
    raise BadInput(f"metric {name}", f"log_metric({name!r}): a value must be a real number or a one-element "
                                     f"real tensor, got {got}")


EVAL_AS_TRAIN = (
    "tensortap: record(..., always=True) ran under no_grad outside a capture step, and no "
    "evaluation was told: it is kept as a training value. If it is an evaluation's, call "
    "tap.log_batch(batch, split=\"val\") at each evaluation batch: its records then say so "
    "and are kept apart from training's (Lightning's validation needs nothing).")
NO_FORWARD_HOOK = (
    "tensortap: in capture step {step} the watched model's gradients came but none of its forward "
    "hooks ran, so no activation is recorded. The step began (log_batch) after the model's forward; "
    "or the forward was called as model.forward(x), which skips hooks (call model(x)); or the model "
    "runs under torch.compile and was compiled before tensortap's hooks existed, or another model of "
    "its class was compiled without them in this process (compiled code keeps the hooks it was "
    "compiled with: make the first compiled call a capture step, as the default cadence does, or use "
    "tap.record())")
SNAPSHOT_KEEP_EVERY = 4  # every_n_steps at or below this keeps the weight snapshot buffers
# deferred tensors held for the grouped launch, at most: DEFER_MAX_BYTES, and on a GPU at
# most 1/DEFER_MEMORY_SHARE of its memory (a 16 GiB GPU: 256 MiB). Autograd keeps about half
# of them for backward anyway; what is held only for the launch is freed at the end of the
# forward, and until then adds to the peak memory of a capture step
DEFER_MAX_BYTES = 1 << 30
DEFER_MEMORY_SHARE = 64
# the flat buffer of watched gradients and weights (client_hooks.flat) is kept between rare
# captures up to this size: making it again costs a view of each parameter twice (~80 view
# operations for the demo FNO's 20 parameters); beyond, it is made at each capture
FLAT_KEEP_BYTES = 64 << 20
PLANS_MAX = 4096  # values with a known short way (Engine._plans); beyond, they are forgotten
GRAD_LAYERS_PER_ENTRY = 512  # gradient layers of one packed entry (its records' names and values)


class Engine:
    def __init__(self, sender, opts: Options):
        self.sender, self.opts = sender, opts
        self.step: Optional[int] = None
        self.epoch: Optional[int] = None
        self.batch_in_epoch = 0
        self.capturing = False
        self.capture = Capture()
        # the split that record(always=True) outside a capture step is taken in: "train" from
        # each train batch on; an evaluation batch's ("val", ...) until the next train batch
        self.split = "train"
        self._eval_at: tuple = (None, None)  # the (step, epoch) an evaluation's records carry, when told
        self._hooks: Optional[_hooks.Hooks] = None
        self._model: Optional[nn.Module] = None
        self._param_hooks, self._all_params, self._trainable = False, [], []
        self._layers: list[tuple[str, list[nn.Parameter]]] = []
        self._wparams: list[nn.Parameter] = []  # every watched layer's parameters, layer by layer
        self._wrange: list[tuple[int, int]] = []  # each layer's slice of _wparams
        self._grad_vecs: dict[int, tuple[Any, int]] = {}  # layer -> (moments: tensor or host list, count)
        self._wnorms: list[torch.Tensor] = []  # per watched parameter, before the optimizer step
        self._before: list[torch.Tensor] = []  # weight snapshot (one foreach copy)
        self._wsaved: Optional[list] = None  # the weights as the step's first gradient read saw them
        self._grad_seen = False
        self._snap: list[torch.Tensor] = []  # reused snapshot buffers (frequent captures only)
        self._total: Any = None  # (1,) tensor: all gradients' norm, when the layers hold only some
        # CUDA with Triton: the watched gradients and weights in one buffer (client_hooks.flat);
        # None: not planned yet, False: does not apply. _flat_rows: this capture's first row
        self._flat: Any = None
        self._flat_rows: Optional[int] = None
        # AMP: () -> the loss scale the gradients carry at the end of backward (a tensor), or
        # None (Tap.watch(scaler=)); its float64 copy of this capture step in _scale
        self.loss_scale = None
        self._scale: Any = None
        # the front door knows when the optimizer steps (Tap given one, Lightning): a capture
        # step in which it did not (gradient accumulation) has no update ratio to report
        self.optimizer_watched = False
        self._stepped = False
        # per watched parameter, the optimizer (its id) that steps it, when known (Tap's list,
        # Lightning's optimizers); the optimizers that stepped in this capture step
        self._optimizers: list = []
        self._owners: list = []
        self._owner_set: set = set()
        self._stepped_opts: set = set()
        self._covers_all = False
        # grouped launch of the forward's tensors (CUDA with Triton, see the module docstring)
        self.group_values = True  # False: every tensor launched in its hook (benchmarks compare)
        self._changed: dict[tuple[str, str], bool] = {}  # value -> changed in place after its hook
        self._checking: list = []  # launched at once, version read at the next launch point
        # (key or None, tensor, version, stream, (Span, lo, hi) to fill, elements); each
        # tensor contiguous, real, non-empty (checked when deferred)
        self._deferred: list = []
        self._deferred_bytes = 0
        self._cap_index, self._cap = None, 0  # the last deferred tensor's device, its defer_cap
        self._grad_specs: dict = {}  # (layers, their counts) -> (record names, packed spec)
        # (kind, name) -> (dtype, shape, device, its get_device(), elements, element size, spec)
        # of a deferred real value: its next captures alike take `_defer_known`
        self._plans: dict = {}
        self._untraced = False  # see _untrace
        # values a compiled forward hands over (its hooks and record(), see hooks.Traced);
        # _keep_hooks: one came from a hook, so the model runs compiled and its hooks stay
        self._traced = _hooks.Traced()
        self._keep_hooks = False
        self._flush_memo = FlushMemo()  # the capture steps' flush layout (Capture.flush)

    # -- set-up ---------------------------------------------------------------------------
    def watch(self, model: nn.Module, param_hooks: bool) -> None:
        """param_hooks: find the end of backward by itself (plain PyTorch); Lightning says so."""
        o = self.opts
        if self._model is not None and model is not self._model:
            say_once("watch replaced", f"tensortap: watch({type(model).__name__}) replaces the model watched "
                     f"before ({type(self._model).__name__}), which is no longer watched; to watch two "
                     "nets (a GAN's), watch a module holding both, e.g. nn.ModuleDict({'G': G, 'D': D})")
        if self._hooks is not None:  # watched before: that model's step ends, its hooks go
            self.end_step()
            self._hooks.detach()
            self._traced.drop_hooks()  # (the new hooks make their own slots)
        # the parameters trainable at any watch of this model: the layers are chosen among them,
        # and a capture step after one more became trainable (a layer unfrozen, as fine-tuning
        # does) chooses them again (`begin_step`). One frozen for a while (a GAN's critic
        # between its steps) stays watched.
        again = model is self._model
        self._model, self._param_hooks = model, param_hooks
        self._all_params = list(model.parameters()) if not again else self._all_params
        now = list(map(_REQUIRES_GRAD, self._all_params))
        self._trainable = [a or b for a, b in zip(now, self._trainable)] if again else now
        ever = {id(p) for p, t in zip(self._all_params, self._trainable) if t}
        self._layers = _hooks.gradient_layers(model, o.gradients, o.all_leaves, frozenset(ever))
        self._wparams = [p for _, ps in self._layers for p in ps]
        at = [0]
        for _, ps in self._layers:
            at.append(at[-1] + len(ps))
        self._wrange = list(zip(at[:-1], at[1:]))  # each layer's slice of _wparams
        self.set_optimizers(self._optimizers)
        self._flat = None  # planned at the first capture's gradients
        # every trainable parameter in a watched layer: the total norm comes from the layers'
        # (a parameter in two watched layers, e.g. tied embedding and head weights: the rows
        # would count it twice, so the total is taken apart, as clip_grad_norm_ counts it)
        ids = [id(p) for p in self._wparams]
        self._covers_all = len(set(ids)) == len(ids) and set(ids) >= ever
        targets = _hooks.activation_targets(model, o.activations, o.all_leaves)
        params = [p for p in model.parameters() if p.requires_grad] if param_hooks else None
        self._hooks = _hooks.Hooks(targets, o.inputs, self.on_output, params,
                                   self.grads_ready if param_hooks else None,
                                   model, self.launch_deferred, on_error=_activations_failed,
                                   traced=self._traced)
        if self._untraced:
            self._hooks.untrace()
        if _hooks.compiler_loaded() and _hooks.compiled_inside(model):
            # compiled already: the hooks go on now, for good, so that its first compiled call
            # (a warm-up, a sanity check) has them; they hand values over in capture steps only
            if not self._untraced:
                self._untrace()
            self._keep_hooks = True
            self._hooks.use_param_hooks()  # its forward hooks are traced: no output hook
            self._hooks.attach()

    def new_epoch(self, epoch: Optional[int]) -> None:
        self.epoch, self.batch_in_epoch = epoch, 0

    def is_capture_step(self) -> bool:
        o = self.opts
        if self.batch_in_epoch < o.first_n:
            return True
        return bool(o.every_n_steps) and self.step is not None and self.step % o.every_n_steps == 0

    # -- step ------------------------------------------------------------------------------
    @guarded("step")
    def begin_step(self, step: Optional[int] = None, epoch: Optional[int] = None) -> bool:
        step, epoch = whole(step, "step"), whole(epoch, "epoch")
        if self.capturing:
            self.end_step()
        elif self._traced.full:  # record(always=True) in a compiled forward outside a capture step
            self._drain()
        if self.split != "train":  # (after the drain: an evaluation's last values keep its split)
            self.split, self._eval_at = "train", (None, None)
        if epoch is not None and epoch != self.epoch:
            self.new_epoch(epoch)
        self.step = step if step is not None else (0 if self.step is None else self.step + 1)
        capturing = self.is_capture_step()
        if capturing and self._model is not None:
            now = list(map(_REQUIRES_GRAD, self._all_params))
            if now != self._trainable and any(map(operator.gt, now, self._trainable)):
                # a parameter trainable that never was at watch (a layer unfrozen): the watched
                # layers and the total norm's parameters are chosen again, with it
                self.watch(self._model, self._param_hooks)
        self.capturing = capturing
        self.batch_in_epoch += 1
        if self.capturing:
            self.capture = Capture(self.step, self.epoch)
            self._grad_seen = False  # a hooked output with grad enabled came in this step
            self._stepped = False
            self._stepped_opts.clear()
            self._reset_grads()
            if not self._untraced and _hooks.compiler_loaded():
                self._untrace()
            if self._hooks is not None:
                if not self._hooks.attached:
                    self._hooks.attach()
                self._hooks.new_step()
            self._traced.live = True  # (end_step sets it back)
        elif self._hooks is not None and self._hooks.attached and not self._keep_hooks:
            self._hooks.detach()  # kept by end_step for a capture that did not come
        return self.capturing

    def _untrace(self) -> None:
        """torch's compiler is imported (torch.compile, or any torch.optim optimizer, has
        imported it): from now on the hooks and record() hand their values over when dynamo
        traces them (hooks.Traced, `_traced_record`), and the other entry points that user
        code may call inside a compiled function (metrics, log_batch, patch) are kept out of
        its tracing (hooks.untraced). Outside tracing each costs one extra check of ~0.06 us.
        Checked at each capture step's start, so that tensortap never imports the compiler
        itself (~1 s)."""
        self._untraced = True
        for name in ("metrics", "log_batch", "patch"):
            setattr(self, name, _hooks.untraced(getattr(self, name)))
        self.record = self._traced_record(self.record)
        if self._hooks is not None:
            self._hooks.untrace()

    def _traced_record(self, record):
        """`record`, which while dynamo traces it (a record() inside a compiled forward) hands
        its value over to `_traced` like a hook (no graph break, see hooks.Traced): in a
        capture step, or always with always=True; `_drain` records it in eager code."""
        compiling, _ = _hooks.tracing_guard()
        if compiling is None:
            return record
        t = self._traced

        def call(name: str, tensor, pair=None, always: bool = False) -> None:
            if compiling():
                if t.live or always:
                    t.record(name, tensor, pair, always)
                return None
            return record(name, tensor, pair, always)
        return functools.wraps(record)(call)

    def _drain(self) -> None:
        """The values a compiled forward handed over (hooks.Traced; callers on the capture
        path check `_traced.full` first: one call less), taken in eager code: each as its
        hook or record() would have taken it in an eager forward (at the end of backward,
        they join the gradients' grouped launch); a hook's value under the grad mode of its
        forward, so that one under no_grad does not replace a training forward's. A
        hook's value says that the model runs compiled, and compiled code keeps the hooks it
        was compiled with: the hooks stay registered from then on (they hand values over
        only while `live`)."""
        t = self._traced
        if not t.full:
            return
        for name, value, pair, how, grad in t.take():
            if how == _hooks.Traced.HOOK:  # (only the hooks hand these over: _hooks is set)
                if not self._keep_hooks:
                    self._keep_hooks = True
                    self._hooks.use_param_hooks()  # a compiled forward puts no hook on its output
                with torch.set_grad_enabled(grad):  # (a drain at the end of backward may run without grad)
                    self._hooks.deliver(name, value)
            else:  # (the method itself: self.record is the traced wrapper)
                with torch.set_grad_enabled(grad):  # (its forward's grad mode: see `record`)
                    Engine.record(self, name, value, pair, how == _hooks.Traced.ALWAYS)

    @guarded("activations")
    def take_traced(self) -> None:
        """Outside a capture step, the values that record(always=True) in a compiled forward
        handed over since the last take (hooks.Traced keeps a name's last value: taken at
        each tensortap call of the loop, each evaluation batch gets its record)."""
        if self._traced.full and not self.capturing:
            self._drain()

    @guarded("activations")
    def evaluating(self, split: str, step: Optional[int] = None, epoch: Optional[int] = None) -> None:
        """An evaluation batch of `split` ("val", "test", ...) begins: from now until the next
        train batch (or `evaluated`), record(always=True) outside a capture step is taken as
        of that split (its records say {"split": split}; the collector keeps them in series
        of their own), at `step` and `epoch` when given (Lightning: its global step and
        epoch, which its validation metrics carry), else at the last training step (0
        before any) and the current epoch. A capture step still open (no optimizer step told
        its end) ends here: the evaluation comes after the training step. What a compiled
        forward handed over before is taken first, in the split it came in."""
        at = (whole(step, "step"), whole(epoch, "epoch"))  # (a bad one: the call is ignored whole)
        if self.capturing:
            self.end_step()
        self.take_traced()
        self.split = split if isinstance(split, str) and split else "eval"
        self._eval_at = at

    @guarded("activations")
    def evaluated(self) -> None:
        """An evaluation (or an epoch) has ended: what a compiled forward handed over is taken
        in its split and epoch, and record(always=True) is a training value again."""
        self.take_traced()
        self.split, self._eval_at = "train", (None, None)

    def _outside(self) -> tuple[Capture, Optional[dict]]:
        """A capture sent now, outside a capture step, and its records' extra fields: an
        evaluation's carry its split and its step (see `evaluating`)."""
        if self.split == "train":
            return Capture(self.step, self.epoch), None
        step, epoch = self._eval_at
        return (Capture(step if step is not None else (self.step or 0), epoch if epoch is not None else self.epoch),
                {"split": self.split})

    def _next_step_captures(self) -> bool:
        """Whether the step after this one will capture (every_n_steps, the same epoch)."""
        o = self.opts
        nxt = (self.step or 0) + 1
        return self.batch_in_epoch < o.first_n or bool(o.every_n_steps) and nxt % o.every_n_steps == 0

    def optimizer_stepping(self, optimizer=None) -> None:
        """An optimizer steps (or has stepped) in this step: its capture's update ratios are real.
        Given which, the layers of watched optimizers that did not step get none (`_unstepped`)."""
        self._stepped = True
        if optimizer is not None:
            self._stepped_opts.add(id(optimizer))

    def set_optimizers(self, optimizers: list) -> None:
        """The optimizers that step the watched parameters (see `_unstepped`)."""
        self._optimizers = list(optimizers)
        owner = {id(p): id(o) for o in self._optimizers for g in o.param_groups for p in g["params"]}
        self._owners = [owner.get(id(p)) for p in self._wparams]
        self._owner_set = {o for o in self._owners if o is not None}

    def _unstepped(self) -> list[int]:
        """Watched parameters whose optimizer did not step in this capture step while another
        did (an optimizer each, one accumulating): no update to measure, so no ratio (0 would
        read as frozen). A parameter no known optimizer steps keeps its measured update."""
        if not self._stepped_opts or self._owner_set <= self._stepped_opts:
            return []  # (every capture step of one optimizer: no loop over the parameters)
        return [i for i, o in enumerate(self._owners) if o is not None and o not in self._stepped_opts]

    def _reset_grads(self) -> None:
        self._grad_vecs, self._wnorms, self._before, self._total, self._scale = {}, [], [], None, None
        self._wsaved = None
        self._flat_rows = None

    def _read_scale(self) -> Any:
        """A float64 copy of the loss scale the gradients carry now (AMP's GradScaler: it
        changes in place at its update), or None."""
        s = self.loss_scale() if self.loss_scale is not None else None
        return None if s is None else s.detach().reshape(1).to(torch.float64, copy=True)

    @guarded("gradients")
    def grads_ready(self) -> None:
        """Gradients are complete and not yet clipped: summarise them, snapshot the weights.

        On CUDA with Triton: the watched gradients and weights into one flat buffer, a row of
        each layer's gradients and one of its weights in one launch (`_flat_grads`). Else
        (`_layer_grads`) per layer one moments vector of its gradients (on CUDA with Triton,
        every layer in one grouped launch), one foreach norm of the weights and one foreach
        copy (the snapshot for update_ratio). The total gradient norm comes from the layers'
        rows when the watched layers hold every trainable parameter, else from one more
        foreach norm."""
        if not self.capturing:
            return
        if self._traced.full:  # a compiled forward's values: before the gradients' grouped launch
            self._drain()
        earlier, self._grad_vecs, self._flat_rows = self._grad_vecs, {}, None
        if self._flat is False or not self._flat_grads():
            self._layer_grads()
            if earlier:  # read again (a backward each): a layer with no gradient now (its
                # optimizer stepped and zeroed them) keeps what its optimizer stepped with
                self._grad_vecs = {**earlier, **self._grad_vecs}
        self._scale = self._read_scale()
        if self._covers_all:
            return  # the total norm comes from the layers' rows (end_step)
        all_grads = _grads(self._model.parameters())
        if all_grads:
            self._total = torch.nn.utils.get_total_norm(all_grads).reshape(1)

    def _layer_grads(self) -> None:
        """grads_ready's way where the flat buffer does not apply (or not in this step: a
        parameter without a gradient): each layer's gradients where they lie."""
        layers = {}
        for i, (_, ps) in enumerate(self._layers):
            gs = _grads(ps)
            if gs:
                layers[i] = gs
        fused = self._fused_grads(layers)  # launches the deferred values too (one group per dtype)
        self.launch_deferred()  # they, when the gradients are not fused (nothing left otherwise)
        if fused:
            self._grad_vecs = fused
        else:
            for i, grads in layers.items():
                count = sum(g.numel() * (2 if g.is_complex() else 1) for g in grads)
                self._grad_vecs[i] = (stats.grad_moments_vector(grads, host_ok=True), count)
        if self._grad_vecs:
            with torch.no_grad():  # the parameters themselves: no detached copies to make
                if self._wsaved is None:
                    self._wnorms = list(torch._foreach_norm(self._wparams))
                    self._before = self._wsaved = self._snapshot(self._wparams)
                else:  # read again (an optimizer each): the update spans them all
                    self._wnorms = self._wnorms or list(torch._foreach_norm(self._wsaved))
                    self._before = self._wsaved

    def _flat_grads(self) -> bool:
        """CUDA with Triton: every watched gradient and weight into the flat buffer (one
        foreach copy), their rows in one launch (client_hooks.flat). False where that does
        not apply: planned once; in a step where a watched parameter has no gradient, the
        layers' way."""
        f = self._flat
        if f is None:
            if not self._wparams:
                return False
            f = self._flat = _flat.plan(self._wparams, self._wrange,
                                        defer_cap(self._wparams[0].get_device())) or False
            if f is False:
                return False
        if f.buf is None:
            try:
                f.make()
            except Exception as e:  # (out of memory): the layers' way from now on
                self._flat = False
                say_once("flat buffer", f"tensortap: no flat buffer for the gradients ({e!r}); "
                         "each layer is read where it lies")
                return False
        grads = [p.grad for p in self._wparams]
        try:
            with torch.no_grad():
                if self._wsaved is None:
                    torch._foreach_copy_(f.views, grads + self._wparams)
                elif self._wsaved is f.wviews:  # read again (an optimizer each): the weights as first seen;
                    # a gradient gone since (its optimizer stepped, then zeroed it) keeps its first read
                    have = [i for i, g in enumerate(grads) if g is not None]
                    if have:
                        torch._foreach_copy_([f.views[i] for i in have], [grads[i] for i in have])
                else:
                    torch._foreach_copy_(f.views, grads + self._wsaved)
        except (TypeError, RuntimeError):  # a gradient is None (or of another layout)
            return False
        self._wsaved = f.wviews
        self.launch_deferred()  # the values deferred since the forward: a group of their own
        try:
            self._flat_rows = self.capture.batch(f.device, f.mod).add_flat(f.buf, f.rel_gw, f.lay_gw, f.unit)[0]
        except Exception as e:  # a Triton failure: the torch path from now on
            stats.fused_failed(e)
            return False
        return True

    def _fused_grads(self, layers: dict) -> Optional[dict]:
        """CUDA with Triton: every layer's gradient statistics in one launch (rows of this
        capture's fused batch), {layer: (row, element count)}; None where that does not
        apply (CPU, mixed dtypes, integer gradients), and the layers are done one by one.
        Each gradient is looked at once here (the launch takes these checks as they are)."""
        if not layers:
            return None
        first = next(iter(layers.values()))[0]
        mod = stats.fused_for(first.device)
        if mod is None:
            return None
        flat, counts, sizes, dev = {}, {}, [], first.device
        dt = stats.real_dtype(first.dtype)
        if dt not in stats.FUSED_DTYPES:
            return None
        for i, gs in layers.items():
            fl, count = [], 0
            for g in gs:  # one dtype and one device (the addresses go into one table)
                if g.dtype is not dt:
                    if not g.is_complex() or stats.real_dtype(g.dtype) is not dt:
                        return None
                    g = torch.view_as_real(g)  # a complex gradient: its real pairs
                n = g.numel()
                if not n or g.device != dev:
                    return None
                fl.append(g if g.is_contiguous() else g.contiguous())
                sizes.append(n)
                count += n
            flat[i], counts[i] = fl, count
        rows = self.launch_deferred((dev, dt, list(flat.values()), tuple(sizes)))
        if rows is None:
            return None
        return {i: (Span(dev, 10 * r, 10 * r + 10), counts[i]) for i, r in zip(flat, rows)}

    def _snapshot(self, ws: list[torch.Tensor]) -> list[torch.Tensor]:
        """Exact copies of the watched weights, one foreach launch. With captures at least
        every SNAPSHOT_KEEP_EVERY steps the buffers are kept and refilled: fresh allocations
        cost more than the copy (3.4 ms against 0.14 ms for the demo FNO's 2.4M weights on
        CPU). Rarer captures allocate them each time, so that between captures the model
        does not carry a second copy of its watched weights."""
        n = self.opts.every_n_steps
        if not (n and n <= SNAPSHOT_KEEP_EVERY):
            return list(torch._foreach_mul(ws, 1.0))
        # (lists, not generators: a generator's every item is one more call on a capture step)
        if len(self._snap) != len(ws) or any([b.shape != w.shape or b.dtype != w.dtype or b.device != w.device
                                             for b, w in zip(self._snap, ws)]):
            self._snap = [torch.empty_like(w) for w in ws]
        torch._foreach_copy_(self._snap, ws)
        return self._snap

    @guarded("step")
    def end_step(self) -> None:
        """Update ratios, then one copy of the whole step to the host; removes the hooks."""
        if not self.capturing:
            return
        if self._traced.full:
            self._drain()
        self.capturing = self._traced.live = False
        if self._hooks is not None and not (self._keep_hooks or self._next_step_captures()):
            self._hooks.detach()  # else kept: re-registering every module's hook costs each step
        late = not self._grad_vecs and self._flat_rows is None and bool(self._layers)
        if late:
            self.capturing = True  # backward end was not seen (unused params): read grads now
            self.grads_ready()
            self.capturing = False
            self._scale = None  # after the optimizer step: a GradScaler has unscaled them
        grads = bool(self._grad_vecs) or self._flat_rows is not None
        h = self._hooks
        if grads and h is not None and late and h.via_output and (h.out_hooked or h.silent()):
            # the output's hooks did not show the end of backward (the loss used none of the
            # outputs): the parameters' hooks from the next capture. Only where gradients were
            # there to read: a capture step with no backward (a skipped batch) is no reason
            h.use_param_hooks()
        if grads and h is not None and h.silent():
            say_once("no forward hook", NO_FORWARD_HOOK.format(step=self.step))
        # read late, the weights snapshot is taken after the optimizer step: no update ratio
        # (a 0 would read as frozen parameters to the collector's diagnosis)
        if self._grad_vecs:
            self._add_gradients(no_update=late)
        elif self._flat_rows is not None:
            self._add_grad_rows(no_update=late)
        if self._total is not None:
            total = self._total.to(torch.float64)
            if self._scale is not None:  # one record, so divided here (the layers': by the collector)
                total = total / self._scale
            self.capture.add("gradients", "_total", total, ["norm"], 64)
        self._reset_grads()
        self.launch_deferred()
        self.capture.flush(self.sender, self._flush_memo)

    def _add_gradients(self, no_update: bool = False) -> None:
        """A record per layer from one packed entry (a few for thousands of layers): the
        layers' moments (consecutive rows of the capture's fused batch on CUDA with Triton,
        else one matrix of the layers' vectors) and every watched parameter's weight and
        update norm (one stacked vector). The collector sums those into each layer's norms
        and update ratio, and the rows into the total norm when the layers hold every
        trainable parameter: no small tensor ops, and no per-layer bookkeeping, here."""
        keys = sorted(self._grad_vecs)
        vecs = [self._grad_vecs[i][0] for i in keys]
        if isinstance(vecs[0], Span):  # rows of the fused batch on device `src`
            src = dev = vecs[0].src
            r0 = 10 * (vecs[0].lo // 10)  # add_group gave the layers consecutive rows
        else:
            src, r0 = _rows(vecs).reshape(-1), 0
            dev = src.device
        # no_update, or (accumulation) no optimizer step: NaN update norms, no ratio
        no_update = no_update or (self.optimizer_watched and not self._stepped)
        norms = self._wnorms
        if not no_update:
            with torch.no_grad():
                torch._foreach_sub_(self._before, self._wparams)  # before - after, in place
            norms = norms + list(torch._foreach_norm(self._before))
            for i in self._unstepped():
                norms[len(self._wparams) + i] = torch.full_like(norms[i], math.nan)
        try:
            pn = torch.stack(norms)
        except RuntimeError:  # parameters on several devices: their norms moved to `dev`
            pn = torch.stack([n.to(dev) for n in norms])
        if no_update:
            pn = torch.cat([pn, torch.full_like(pn, math.nan)])
        if pn.device != dev:
            pn = pn.to(dev)
        npar = len(self._wparams)
        scale = self._scale
        dk = (tuple(keys), tuple([self._grad_vecs[i][1] for i in keys]), scale is not None)
        specs = self._grad_specs.get(dk)
        if specs is None:
            if len(self._grad_specs) > 16:
                self._grad_specs.clear()
            specs = self._grad_specs[dk] = self._make_grad_specs(keys, dk[1], dk[2])
        add_many = self.capture.add_many
        for j0, j1, a, b, names, spec in specs:  # layers j0..j1 of keys, parameters a..b
            vec = (Span(src, r0 + 10 * j0, r0 + 10 * j1), Span(pn, a, b), Span(pn, npar + a, npar + b))
            add_many("gradients", names, vec if scale is None else vec + (Span(scale, 0, 1),), spec, 500)

    def _add_grad_rows(self, no_update: bool = False) -> None:
        """The gradient records of the flat buffer (client_hooks.flat): after the optimizer
        step, the update (weights before minus after) in the weights' half by one foreach
        subtraction and its rows by one launch; then the layers' packed entries
        (collector.packed "grad_rows"), their values three runs of the capture's rows."""
        f, rg = self._flat, self._flat_rows
        updated = not (no_update or (self.optimizer_watched and not self._stepped))  # (accumulation): no ratio
        dev, nl = f.device, f.nlayers
        ru = 0
        if updated:
            try:
                with torch.no_grad():
                    torch._foreach_sub_(f.wviews, self._wparams)  # before - after, in place
                    for i in self._unstepped():
                        f.wviews[i].fill_(math.nan)
                ru = self.capture.batch(dev, f.mod).add_flat(f.buf, f.rel_w, f.lay_w, f.unit)[0]
            except Exception as e:  # a Triton failure: no update ratio in this capture
                stats.fused_failed(e)
                updated = False
        scale = self._scale
        key = (updated, scale is not None)
        specs = f.specs.get(key)
        if specs is None:
            specs = f.specs[key] = self._make_row_specs(f, updated, scale is not None)
        add_many = self.capture.add_many
        for j0, j1, names, spec in specs:
            if spec[0] == "total":  # the gradients' rows alone
                vec = (Span(dev, 10 * rg, 10 * (rg + nl)),)
            else:
                vec = (Span(dev, 10 * (rg + j0), 10 * (rg + j1)), Span(dev, 10 * (rg + nl + j0), 10 * (rg + nl + j1)))
                if updated:
                    vec += (Span(dev, 10 * (ru + j0), 10 * (ru + j1)),)
            add_many("gradients", names, vec if scale is None else vec + (Span(scale, 0, 1),), spec, 500)
        n = self.opts.every_n_steps
        if not (n and n <= SNAPSHOT_KEEP_EVERY) and f.nbytes > FLAT_KEEP_BYTES:
            f.drop()  # rare captures of a big model: no copy of its watched weights between them

    def _make_row_specs(self, f, updated: bool, scaled: bool) -> list:
        """`_make_grad_specs` for the flat buffer's rows: (j0, j1, names, spec) per entry of
        up to GRAD_LAYERS_PER_ENTRY layers, the total norm in it when that is all of them,
        else in a "total" entry of its own."""
        out, n, per = [], f.nlayers, GRAD_LAYERS_PER_ENTRY
        sc = [True] if scaled else []
        for j0 in range(0, n, per):
            j1 = min(n, j0 + per)
            total = self._covers_all and n <= per
            names = tuple(self._layers[i][0] for i in range(j0, j1)) + (("_total",) if total else ())
            out.append((j0, j1, names, ["grad_rows", f.counts[j0:j1], total, updated] + sc))
        if self._covers_all and n > per:
            out.append((0, n, ("_total",), ["total"] + sc))
        return out

    def _make_grad_specs(self, keys: list, counts: tuple, scaled: bool) -> list:
        """The packed entries of the gradient records (collector.packed "grads"): one for up
        to GRAD_LAYERS_PER_ENTRY layers, with the total norm in it when that is all of them,
        else in an entry of its own. (j0, j1, a, b, names, spec) each: layers j0..j1 of keys,
        their parameters a..b of the watched ones. scaled: the loss scale is their last value."""
        out, n, per = [], len(keys), GRAD_LAYERS_PER_ENTRY
        for j0 in range(0, n, per):
            ks, j1 = keys[j0:j0 + per], min(n, j0 + per)
            a, b = self._wrange[ks[0]][0], self._wrange[ks[-1]][1]
            total = self._covers_all and n <= per
            names = tuple(self._layers[i][0] for i in ks) + (("_total",) if total else ())
            spec = ["grads", list(counts[j0:j1]), [[x - a, y - a] for x, y in (self._wrange[i] for i in ks)],
                    b - a, total] + ([True] if scaled else [])
            out.append((j0, j1, a, b, names, spec))
        if self._covers_all and n > per:
            out.append((0, n, 0, 0, ("_total",), ["total"] + ([True] if scaled else [])))
        return out

    # -- values ----------------------------------------------------------------------------
    def add_tensor(self, kind: str, name: str, value, extra: Optional[dict] = None,
                   cap: Optional[Capture] = None) -> None:
        """Queue the stats of one tensor (or {"value": x} for a scalar) into a capture."""
        if (cap is None or cap is self.capture) and self._defer_known(kind, name, value, extra):
            return
        self._add_long(kind, name, value, extra, cap)

    def _add_long(self, kind: str, name: str, value, extra: Optional[dict] = None,
                  cap: Optional[Capture] = None) -> None:
        """add_tensor without its short way (`_defer_known`), which the caller has tried."""
        extra, cap = extra or {}, (self.capture if cap is None else cap)
        if not isinstance(value, torch.Tensor):
            cap.add(kind, name, None, lambda v, x=value: {"value": x, **extra}, 128)
            return
        pair = self.opts.pairs.get(name)
        t, shape, dt = value.detach(), value.shape, stats.dtype_name(value.dtype)
        is_c = pair is not None or t.is_complex()
        if is_c:
            shape = _shape_of_pair(t, pair)
            vec = self._fused_complex(cap, t, pair)
            if vec is None:
                vec = stats.complex_vector(t, pair, host_ok=True)
        else:
            vec = self._fused_real(cap, (kind, name), t)
            if vec is None:
                vec = stats.tensor_stats_vector(t, host_ok=True)
        spec = ["tensor", list(shape), dt, is_c, extra or None]
        if type(vec) is Span and vec.lo < 0 and not is_c:  # deferred: see _defer_known
            if len(self._plans) >= PLANS_MAX:
                self._plans.clear()
            self._plans[(kind, name)] = _Plan((kind, name), t, vec, spec)
        cap.add(kind, name, vec, spec, 600 if is_c else 300)

    def _defer_known(self, kind: str, name: str, value, extra: Optional[dict] = None) -> bool:
        """add_tensor's short way for a value deferred before (its `_Plan`) when it comes
        again alike (dtype, shape, device, contiguous, not under inference mode) into this
        step's capture: its entry as it was (spec, and a Span that it points at its row once
        launched), deferred without add_tensor's checks. A plan exists only while its value
        is known unchanged after its hook and is not a declared pair (`_forget`). False: take
        the long way. One such call per watched module a capture step, on the training
        thread: in a step bound by its host (bench/overhead.py on some H100s) each one shows.
        extra: the record's extra fields (a batch field's split and batch), this capture's."""
        plan = self._plans.get((kind, name))
        if plan is None or not self.capturing or not self.group_values or type(value) is not torch.Tensor:
            return False
        index = plan.index
        if (value.dtype is not plan.dtype or value.get_device() != index or value.shape != plan.shape
                or not value.is_contiguous() or value.is_inference()):
            return False
        plan.span.lo = -1  # (the last capture's row: that capture is sent)
        self.capture.add(kind, name, plan.span, plan.spec if not extra else plan.spec[:4] + [extra], 300)
        self._hold(plan.key, value, plan.targets, plan.n, plan.nbytes, stats.raw_stream(index), index)
        return True

    def _forget(self, key: tuple) -> None:
        """Value `key` changed in place after its hook (or became a declared pair): no short
        way for it from now on."""
        self._changed[key] = True
        self._plans.pop(key, None)

    def _fused_real(self, cap: Capture, key: tuple, t: torch.Tensor) -> Optional[Span]:
        """A real tensor on the fused path: deferred into this step's grouped launch when its
        value is known to stay unchanged until then, else launched now (and, the first time,
        watched to learn which). None where the fused path does not apply."""
        mod = stats.fused_module(t)
        if mod is None:
            return None
        if cap is not self.capture or not self.capturing or t.is_inference() or not self.group_values:
            return _fused_span(cap, t, mod)  # a capture sent now, or no version counter to read
        changed = self._changed.get(key)
        if changed is False and t.is_contiguous():
            span = Span(t.device, -1, -1)  # its row is known once the group is launched
            self._defer(key, t, ((span, 0, 7),))
            return span
        if changed is None:
            self._checking.append((key, t, t._version))
        return _fused_span(cap, t, mod)

    def _defer(self, key: Optional[tuple], t: torch.Tensor, targets: tuple) -> None:
        """Hold `t` for the next grouped launch; `targets`: (Span, lo, hi) to point at values
        lo..hi of its row once launched. key None: a tensor of tensortap's own, which nobody
        else can change."""
        if key is None and not t.is_contiguous():  # (a value's own is deferred only when it is)
            t = t.contiguous()
        n, index = t.numel(), t.get_device()
        self._hold(key, t, targets, n, n * t.element_size(), stats.raw_stream(index), index)

    def _hold(self, key: Optional[tuple], t: torch.Tensor, targets: tuple, n: int, nbytes: int,
              stream: int, index: int) -> None:
        """`_defer`'s bookkeeping (also `_defer_known`'s): `t` of n elements joins the next
        grouped launch on `stream` (the current one) of device `index` (t.get_device()), which
        comes early past `defer_cap(index)`."""
        self._deferred.append((key, t, t._version, stream, targets, n))
        self._deferred_bytes += nbytes
        if index != self._cap_index:
            self._cap_index, self._cap = index, defer_cap(index)
        if self._deferred_bytes > self._cap:
            self.launch_deferred()

    def _fused_complex(self, cap: Capture, t: torch.Tensor, pair) -> Optional[tuple]:
        """A complex tensor (or a declared pair) on CUDA with Triton: five rows of one grouped
        launch (deferred into the step's next one when this capture is the step's): real,
        imag and angle made NaN where a part is not finite (|z| is then inf or NaN, so |z| * 0
        is NaN there and 0 elsewhere), |z| as it is (its finite values are those of the
        finite elements), and the angle as it is. The element counts are read off the rows:
        NaN (an element with a NaN part) from the plain angle, which is NaN exactly there;
        Inf (an infinite part) from |z|, which is inf exactly there (also beside a NaN; and
        where |z| of two finite parts overflows). About 4 kernels before the launch. None
        where this does not apply."""
        mod = stats.fused_for(t.device)
        if mod is None or not t.numel():
            return None
        re, im, ab, ang = stats.complex_parts(t, pair)
        dev = t.device
        try:
            p0, p1, p2 = torch.stack([re, im, ang]).add_(ab, alpha=0).unbind(0)  # + |z| * 0: one kernel
            rows = (p0, p1, ab, p2, ang)
            # nan, inf; nfinite, then real's (min, max, mean, std); imag's, abs', angle's
            out = (Span(dev, -1, -1), Span(dev, -1, -1), Span(dev, -1, -1), Span(dev, -1, -1),
                   Span(dev, -1, -1), Span(dev, -1, -1))
            targets = (((out[2], 2, 7),), ((out[3], 3, 7),), ((out[1], 1, 2), (out[4], 3, 7)),
                       ((out[5], 3, 7),), ((out[0], 0, 1),))
            if cap is self.capture and self.capturing and self.group_values and p0.dtype in stats.FUSED_DTYPES:
                n, index = ab.numel(), ab.get_device()  # (five rows alike: `_defer`'s look, once)
                nbytes, stream = n * ab.element_size(), stats.raw_stream(index)
                for x, tg in zip(rows, targets):
                    self._hold(None, x if x.is_contiguous() else x.contiguous(), tg, n, nbytes, stream, index)
                return out
            for r, tg in zip(cap.batch(dev, mod).add_group([[x] for x in rows]), targets):
                _point(tg, r)
        except Exception as e:
            stats.fused_failed(e)
            return None
        return out

    @guarded("activations")
    def launch_deferred(self, extra: Optional[tuple] = None) -> Optional[list[int]]:
        """A launch point: learn which watched values changed in place since their hook, and
        launch the deferred tensors' partials (one grouped launch per dtype and stream).

        extra: (device, dtype, layers, their tensors' sizes), the gradients at the end of
        backward: launched in the group of the deferred tensors of that device and dtype on
        the current stream.
        Returns their rows, or None when they were not launched (the caller reads them
        another way)."""
        if not (self._checking or self._deferred or extra):
            return None
        checking, self._checking = self._checking, []
        for key, t, version in checking:  # a module called twice: changed if either was
            if t._version != version:
                self._forget(key)
            else:
                self._changed.setdefault(key, False)
        deferred, self._deferred, self._deferred_bytes = self._deferred, [], 0
        groups: dict = {}
        for key, t, version, stream, targets, n in deferred:
            if key is not None and t._version != version:  # changed after all: cannot be read now
                self._forget(key)
                say_once(f"in-place {key}", f"tensortap: {key[1]} changed in place after its hook; "
                         "this capture's record of it is dropped, and it is read in its hook from now on")
                continue
            groups.setdefault((t.device, t.dtype, stream), []).append((t, targets, n))
        extra_rows = None
        if extra is not None:
            dev, dtype, layers, sizes = extra
            stream = stats.current_stream(dev)
            extra_rows = self._launch_group(dev, stream, groups.pop((dev, dtype, stream), []), layers, sizes)
        for (dev, _, stream), items in groups.items():
            self._launch_group(dev, stream, items, [], ())
        return extra_rows

    def _launch_group(self, dev: torch.device, stream, items: list, layers: list,
                      sizes: tuple) -> Optional[list[int]]:
        """One grouped launch: a row per deferred tensor in `items` (their Spans filled), then
        a row per layer in `layers` (returned; `sizes`: their tensors' element counts, each
        tensor checked like a deferred one). On a Triton failure the deferred tensors are
        read by the torch path and None is returned."""
        try:
            with _on_stream(dev, stream):
                rows = self.capture.batch(dev, stats.fused_for(dev)).add_group(
                    [[t] for t, _, _ in items] + layers, tuple([n for _, _, n in items]) + sizes)
        except Exception as e:  # a Triton failure: these values by the torch path, now
            stats.fused_failed(e)
            for t, targets, _ in items:
                vec = stats.tensor_stats_vector(t).to(torch.float64)
                for span, lo, hi in targets:
                    span.src, span.lo, span.hi = vec, lo, hi
            return None
        for (_, targets, _), r in zip(items, rows):  # _point, inline: a call less per value
            for span, lo, hi in targets:
                span.lo, span.hi = 10 * r + lo, 10 * r + hi
        return rows[len(items):]

    def on_output(self, name: str, output) -> None:
        """A forward hook's value (the hook catches what this raises: `_activations_failed`).
        A tensor met before alike takes `_defer_known` straight from here: one call of it
        per watched module a capture step."""
        if not self.capturing:  # hooks kept between two capture steps (e.g. validation)
            return
        # an evaluation forward under no_grad (in the step, after training's) does not replace
        # the training forward's value; a module called twice alike: the last call
        if torch.is_grad_enabled():
            self._grad_seen, keep = True, None
        else:
            keep = self.capture.has if self._grad_seen else None
        if type(output) is torch.Tensor or isinstance(output, torch.Tensor):  # (a subclass: _defer_known says no)
            if keep is not None and keep("activations", name):
                return
            if not self._defer_known("activations", name, output):
                self._add_long("activations", name, output)
            return
        for sub, leaf in walk(output, root=""):
            if isinstance(leaf, torch.Tensor) and not (keep is not None and keep("activations", f"{name}.{sub}")):
                self.add_tensor("activations", f"{name}.{sub}", leaf)

    @guarded("activations")
    def record(self, name: str, tensor, pair=None, always: bool = False) -> None:
        if not (self.capturing or always) or (type(name) is not str or not 0 < len(name) <= NAME_MAX) \
                and bad_name("record", name):  # (inline: a str, the common case, makes no call)
            return
        values = _recordable(name, tensor, pair)
        if pair is not None and self.opts.pairs.get(name) != pair:
            self.opts.pairs[name] = pair
            self._plans.pop(("activations", name), None)  # a pair from now on: no short way
        cap, extra = (self.capture, None) if self.capturing else self._outside()  # outside: sent now
        if extra is None and not self.capturing and not torch.is_grad_enabled():
            say_once("eval as train", EVAL_AS_TRAIN)
        for key, value in values:
            if not (type(key) is str and 0 < len(key) <= NAME_MAX or not bad_name("record", key)):
                continue
            if type(value) is torch.Tensor and (value.layout is not torch.strided or value.is_quantized):
                say_once(f"record {key}", f"tensortap: record({key!r}) cannot be measured (a "
                         f"{_kind_of(value)} tensor); it is not recorded")  # (this value alone)
                continue
            self.add_tensor("activations", key, value, extra, cap)
        if not self.capturing:
            cap.flush(self.sender)

    @guarded("loader_stats")
    def log_batch(self, batch, split: str, batch_idx: Optional[int]) -> None:
        """Field stats into this capture step, or (outside one) into a capture sent now."""
        extra = {"split": split, "batch": batch_idx if batch_idx is not None else self.batch_in_epoch - 1}
        cap = self.capture if self.capturing else self._outside()[0]
        cut: list = []
        for name, leaf in walk(batch, cut=cut):
            if (type(name) is not str or not 0 < len(name) <= NAME_MAX) and bad_name("log_batch", name):
                continue
            if type(leaf) is not torch.Tensor or leaf.layout is torch.strided and not leaf.is_quantized:
                self.add_tensor("loader_stats", name, leaf, extra, cap)
            else:  # this field alone (before, one such field failed them all for the run)
                say_once(f"field {name}", f"tensortap: batch field {name!r} cannot be measured (a "
                         f"{_kind_of(leaf)} tensor); it is not recorded")
        if cut:
            say_once("batch cut", f"tensortap: log_batch records at most {MAX_FIELDS} fields, at most {MAX_DEPTH} "
                     f"levels down; this batch has more (from {cut[0]!r} on, not recorded)")
        if not self.capturing:
            cap.flush(self.sender)

    @guarded("loader_stats")
    def send_now(self, kind: str, name: str, data: dict) -> None:
        self.sender.send(kind, name, data, self.step, self.epoch)

    @guarded("metrics")
    def metrics(self, values: dict, step: Optional[int], epoch: Optional[int]) -> None:
        """{name: tensor or number}, sent now (every step is fine). A one-element tensor of
        this capture step goes with the capture's copy (a float64 copy of it now, in case it
        changes in place before the step ends; a packed "value" entry); any other is copied
        to the host on its own (`scalar_to_host`, without a capture's bookkeeping). Either is
        read on the sender thread. A CPU tensor is read at once (nothing to wait for)."""
        items = []
        if self._traced.full and not self.capturing:  # (take_traced inline: every log_loss passes here)
            self._drain()
        step, epoch = whole(step, "step"), whole(epoch, "epoch")
        with_capture = self.capturing and step == self.step and epoch == self.epoch
        for name, v in values.items():
            if (type(name) is not str or not 0 < len(name) <= NAME_MAX) and bad_name("log_metric", name):
                continue  # (the check inline: log_loss comes here every step)
            try:
                v = metric_value(name, v)
            except BadInput as e:  # this value only: the others of the call still go
                say_once(f"input {e.key}", f"tensortap: {e}; it is not recorded")
                continue
            if isinstance(v, torch.Tensor):
                if stats.read_now(v.device):  # CPU: no device to wait for, nothing to copy
                    value = float(v.detach().real)  # training thread; CPU: no device wait
                    if with_capture:
                        self.capture.add("metrics", name, [value], ["value"], 64)
                    else:
                        items.append(("metrics", name, {"value": value}, 64))
                    continue
                if with_capture and not v.is_complex():
                    self.capture.add("metrics", name, v.detach().reshape(1).to(torch.float64, copy=True),
                                     ["value"], 64)
                    continue
                rb = scalar_to_host(v)
                items.append(("metrics", name, lambda rb=rb: {"value": rb.values()[0]}, 64))
            else:
                items.append(("metrics", name, {"value": v}, 64))
        if items:
            self.sender.send_many(items, step, epoch)

    @guarded("patch_metrics")
    def patch(self, pred, target, scale, note, name, step, epoch) -> None:
        if bad_name("patch_metrics", name):
            return
        step, epoch = whole(step, "step"), whole(epoch, "epoch")
        pred, target = _leaf(pred), _leaf(target)  # (NumPy arrays as tensors)
        if not isinstance(pred, torch.Tensor) or not isinstance(target, torch.Tensor):
            raise BadInput(f"patch {name}", f"patch_metrics({name!r}): pred and target must be tensors or "
                                            "NumPy arrays")
        try:
            vec = stats.patch_vector(pred, target, scale)
        except stats.PatchShapes as e:
            raise BadInput(f"patch {name}", str(e)) from None
        count = pred.numel()
        cap = Capture(step, epoch)
        cap.add("patch_metrics", name, vec, lambda v: stats.patch_dict(v, count, scale is not None, note))
        cap.flush(self.sender)

    @guarded("events")
    def event(self, name: str, data: dict, step=None, epoch=None) -> None:
        self.sender.send("events", name, data, step, epoch)

    @guarded("events")
    def epoch_event(self, name: str, epoch, begin: bool) -> None:
        """epoch_start (a new epoch: its batch count starts again) or epoch_end."""
        epoch = whole(epoch, "epoch")
        if not self.capturing:
            self.evaluated()  # (before the epoch changes: the values it holds are of the last one)
        if begin:
            self.new_epoch(epoch)
        self.sender.send("events", name, {"epoch": epoch}, self.step, epoch)

    def close(self) -> None:
        self.end_step()
        self._drain()  # record(always=True) in a compiled forward after the last capture step
        self._snap = []
        if self._flat:
            self._flat.drop()
        if self._hooks is not None:
            self._hooks.detach()


class _Plan:
    """A value deferred before, for `Engine._defer_known`: what it was (dtype, shape, device
    index, elements, bytes) and what its capture entry holds, made once: the Span that its
    row fills (reused by each capture: the last one is sent before the next begins), the
    spec."""
    __slots__ = ("key", "dtype", "shape", "index", "n", "nbytes", "span", "spec", "targets")

    def __init__(self, key: tuple, t: torch.Tensor, span: Span, spec: list):
        self.key, self.dtype, self.shape, self.index = key, t.dtype, t.shape, t.get_device()
        self.n = t.numel()
        self.nbytes = self.n * t.element_size()
        if spec[4] is not None:  # (extra fields: each capture gives its own)
            spec = spec[:4] + [None]
        self.span, self.spec, self.targets = span, spec, ((span, 0, 7),)


_memory: dict = {}  # CUDA device index -> its total memory in bytes


def _recordable(name: str, value, pair) -> list[tuple[str, Any]]:
    """[(name, value)] that `record` can measure: a tensor, a NumPy array, a number, or a
    structure of them (tuple, dict, dataclass: a name each, as a module's output gets). A
    pair is checked here, on this value, so a wrong one is not kept for the name."""
    one = _leaf(value)
    if one is None and isinstance(value, complex):
        one = torch.tensor(value)
    if one is not None:
        if pair is not None:
            if not isinstance(one, torch.Tensor):
                raise BadInput(f"pair {name}", f"record({name!r}): a pair needs a tensor, got {type(value).__name__}")
            kind, dim = stats.pair_spec(pair)
            try:
                stats._check_pair(one, kind, dim)
            except (ValueError, IndexError) as e:
                raise BadInput(f"pair {name}", f"record({name!r}): {str(e).removeprefix('tensortap: ')}") from None
        return [(name, one)]
    if pair is None:
        found = [(f"{name}.{sub}", v) for sub, v in walk(value, root="")]
        if found:
            return found
    raise BadInput(f"record {name}", f"record({name!r}): a value must be a tensor, a NumPy array or a number, "
                                     f"got {type(value).__name__}")


def device_memory(index: int) -> Optional[int]:
    """Total memory of CUDA device `index` (read once), None off CUDA (index < 0)."""
    if index < 0:
        return None
    total = _memory.get(index)
    if total is None:
        total = _memory[index] = torch.cuda.get_device_properties(index).total_memory
    return total


def defer_cap(index: int) -> int:
    """Bytes of deferred tensors held at most on device `index` (t.get_device())."""
    total = device_memory(index)
    return DEFER_MAX_BYTES if total is None else min(DEFER_MAX_BYTES, total // DEFER_MEMORY_SHARE)


def _rows(vecs: list) -> torch.Tensor:
    """Per-layer vectors (tensors, or lists of host floats from the CPU path) as one matrix."""
    if all(isinstance(v, list) for v in vecs):
        return torch.tensor(vecs, dtype=torch.float64)
    dev = next(v.device for v in vecs if isinstance(v, torch.Tensor))
    return torch.stack([v if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=torch.float64, device=dev)
                        for v in vecs])


def _fused_span(cap: Capture, t: torch.Tensor, mod) -> Optional[Span]:
    """Launch the statistics of real `t` into the capture's fused batch now (one kernel; a
    later in-place change of t cannot alter them) and return the Span of its row: [nan, inf,
    nfinite, min, max, mean, std]. mod: client_hooks.fused. None if the launch failed."""
    try:
        row = cap.batch(t.device, mod).add(t)
    except Exception as e:
        stats.fused_failed(e)
        return None
    return Span(t.device, 10 * row, 10 * row + 7)


def _point(targets: tuple, row: int) -> None:
    """Point each (Span, lo, hi) of `targets` at values lo..hi of the fused batch's `row`."""
    for span, lo, hi in targets:
        span.lo, span.hi = 10 * row + lo, 10 * row + hi


def _on_stream(dev: torch.device, stream: int):
    """Launch on `stream` of `dev` when that is not the current one (a deferred tensor made
    on a side stream is read on that stream, after the kernels that made it)."""
    if dev.type == "cuda" and stream != stats.current_stream(dev):
        return torch.cuda.stream(torch.cuda.ExternalStream(stream, device=dev))
    return contextlib.nullcontext()


def _shape_of_pair(t: torch.Tensor, pair) -> list[int]:
    """The complex shape of `t`: its own, or without the pair's dimension."""
    if pair is None:
        return list(t.shape)
    dim = stats.pair_spec(pair)[1]
    shape = list(t.shape)
    del shape[dim]
    return shape
