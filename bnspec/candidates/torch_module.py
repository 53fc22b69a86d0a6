"""Child-side adapter for any torch-style module factory (torch's, bnspec's, a user's).

It only drives the module the way a user would and reports what happened; it never
judges. Everything it returns is plain data or tensors (see ``bnspec.isolation.wire``).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable

import torch

from bnspec.candidates.layouts import apply_layout
from bnspec.candidates.protocol import FULL, Capabilities, as_given, native_facts

STATE_NAMES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
#: Constructor probes, in torch's order: (piece, positional arguments after num_features, keywords).
#: A keyword the suite passes must work as a keyword; torch's positional order must work too.
CONSTRUCTOR_PROBES = (
    ("eps", (1e-3,), {"eps": 1e-3}),
    ("momentum", (1e-3, 0.2), {"momentum": 0.2}),
    ("affine", (1e-3, 0.2, True), {"affine": True}),
    ("track_running_stats", (1e-3, 0.2, True, True), {"track_running_stats": True}),
    ("momentum=None", (), {"momentum": None}),
    ("affine=False", (), {"affine": False}),
    ("track_running_stats=False", (), {"track_running_stats": False}),
    ("bias=False", (), {"bias": False}),
    ("device", (), {"device": "<device>"}),
    ("dtype", (), {"dtype": torch.float64}),
)
_RESETS = ("reset_running_stats", "reset_parameters")
_SETTABLE = ("momentum", "eps")


class WrongOutput(Exception):
    """The candidate returned something that is not a tensor."""


class TorchModuleAdapter:
    """Drives modules made by ``factories[dims](num_features, **kwargs)``."""

    def __init__(self, factories: dict[int, Callable], capabilities: Capabilities = FULL,
                 device: str = "cpu") -> None:
        self.factories = factories
        self.capabilities = capabilities
        self.device = torch.device(device)
        self.modules: dict[int, Any] = {}
        self.eval_no_grad = False  #: the diagnosis' grad-mode variation: eval forwards under no_grad

    def native(self) -> dict:
        """The module's own constructor defaults (torch's momentum is passed to it as given)."""
        factory = self.factories[min(self.factories)]
        name = f"{getattr(factory, '__module__', '?')}.{getattr(factory, '__qualname__', repr(factory))}"
        return native_facts(name, factory, eps="eps", momentum="momentum", translate=as_given)

    def set_option(self, name: str, value: bool) -> None:
        """``eval_no_grad``: run every eval-mode forward that takes no gradient under
        ``torch.no_grad()`` (how a layer that picks its statistics by grad mode is recognised)."""
        if name != "eval_no_grad":
            raise ValueError(f"set_option: unknown option {name!r}")
        self.eval_no_grad = bool(value)

    # -- construction -----------------------------------------------------------------
    def signature(self, dims: int) -> dict:
        sig = inspect.signature(self.factories[dims])
        return {
            name: {"kind": p.kind.name, "default": repr(p.default) if p.default is not p.empty else None}
            for name, p in sig.parameters.items()
        }

    def discover(self, dims: int) -> dict:
        """What the candidate can be built with and what its instances have.

        ``{"constructor": {piece: None | why not}, "instance": {piece: None | why not} | None}``;
        None means present. Each probe is the call a torch user makes; nothing is judged here.
        """
        factory = self.factories[dims]
        constructor = {}
        positional = True  # torch's positional order holds so far (after a gap, later positions shift)
        for piece, args, kwargs in CONSTRUCTOR_PROBES:
            kwargs = {k: (str(self.device) if v == "<device>" else v) for k, v in kwargs.items()}
            calls = [((4,), kwargs)] + ([((4, *args), {})] if args and positional else [])
            constructor[piece] = None
            for a, kw in calls:
                why = _probe(lambda: factory(*a, **kw))
                if why is not None:
                    shown = ", ".join([*map(repr, a), *(f"{k}={v!r}" for k, v in kw.items())])
                    constructor[piece] = f"{_factory_name(factory)}({shown}) raised {why}"
                    break
            if args and constructor[piece] is not None:
                positional = False
        if constructor["momentum=None"] is None:
            constructor["momentum=None"] = _cumulative_probe(factory, dims)
        try:
            m = factory(4)
        except BaseException as exc:  # noqa: BLE001 - candidate code
            return {"constructor": constructor, "instance": None,
                    "unbuildable": f"{_factory_name(factory)}(4) raised {_exc_text(exc)}"}
        return {"constructor": constructor, "instance": _instance_pieces(m)}

    def construct(self, dims: int, num_features: int, kwargs: dict, cast_dtype: str | None = None) -> int:
        """``factories[dims](num_features, **kwargs)``; ``cast_dtype`` builds without a ``dtype``
        keyword and converts with ``.to(dtype)`` (for a constructor that has none)."""
        kwargs = dict(kwargs)
        if isinstance(kwargs.get("dtype"), str):
            kwargs["dtype"] = getattr(torch, kwargs["dtype"])
        module = self.factories[dims](num_features, **kwargs)
        if cast_dtype is not None:
            module = module.to(getattr(torch, cast_dtype))
        if self.device.type != "cpu" and "device" not in kwargs:
            module = module.to(self.device)
        handle = self._next = getattr(self, "_next", -1) + 1
        self.modules[handle] = module
        return handle

    # -- state ------------------------------------------------------------------------
    def describe(self, h: int) -> dict:
        m = self.modules[h]
        attrs = {}
        for name in ("num_features", "eps", "momentum", "affine", "track_running_stats", "training"):
            value = getattr(m, name, _MISSING)
            attrs[name] = value if isinstance(value, (int, float, bool, type(None))) else repr(value)
        return {
            "attrs": attrs,
            "state": self._state(m),
            "parameters": {k: v for k, v in m.named_parameters()} if hasattr(m, "named_parameters") else None,
            "buffers": {k: v for k, v in m.named_buffers()} if hasattr(m, "named_buffers") else None,
            "param_names": [k for k, _ in m.named_parameters()] if hasattr(m, "named_parameters") else None,
            "buffer_names": [k for k, _ in m.named_buffers()] if hasattr(m, "named_buffers") else None,
        }

    @staticmethod
    def _state(m: Any) -> dict:
        state = {}
        for name in STATE_NAMES:
            value = getattr(m, name, _MISSING)
            if value is _MISSING:
                state[name] = "missing"
            elif value is None or isinstance(value, torch.Tensor):
                state[name] = value
            else:
                state[name] = f"not a tensor: {type(value).__name__}"
        return state

    def set_training(self, h: int, flag: bool) -> None:
        self.modules[h].train(bool(flag))

    def release(self, h: int) -> None:
        self.modules.pop(h, None)

    def set_state(self, h: int, values: dict) -> dict:
        """Copy values into existing weight/bias/running statistics/counter in place."""
        m = self.modules[h]
        with torch.no_grad():
            for name, value in values.items():
                if name not in STATE_NAMES:
                    raise ValueError(f"set_state: {name!r} is not one of {STATE_NAMES}")
                target = getattr(m, name)
                if not isinstance(target, torch.Tensor):
                    raise TypeError(f"module attribute {name!r} is {type(target).__name__}, not a tensor")
                target.copy_(value.to(target.device))
        return self._state(m)

    def set_attr(self, h: int, name: str, value: Any) -> None:
        if name not in _SETTABLE:
            raise ValueError(f"set_attr: {name!r} is not settable; allowed: {_SETTABLE}")
        setattr(self.modules[h], name, value)

    def reset(self, h: int, method: str) -> dict:
        if method not in _RESETS:
            raise ValueError(f"reset: {method!r} not allowed; allowed: {_RESETS}")
        getattr(self.modules[h], method)()
        return self._state(self.modules[h])

    def state_dict(self, h: int) -> dict:
        sd = self.modules[h].state_dict()
        return {"keys": list(sd.keys()), "values": dict(sd)}

    def load_state_dict(self, h: int, sd: dict) -> dict:
        sd = {k: v.to(self.device) for k, v in sd.items()}
        self.modules[h].load_state_dict(sd, strict=True)
        return self._state(self.modules[h])

    # -- computation ------------------------------------------------------------------
    def _input(self, x: torch.Tensor, layout: str, requires_grad: bool) -> torch.Tensor:
        xin = apply_layout(x.to(self.device), layout)
        return xin.requires_grad_(True) if requires_grad else xin

    def _params(self, m: Any) -> dict[str, torch.Tensor]:
        out = {}
        for name in ("weight", "bias"):
            p = getattr(m, name, None)
            if isinstance(p, torch.Tensor) and p.requires_grad:
                out[name] = p
        return out

    def forward(self, h: int, x: torch.Tensor, layout: str = "contiguous",
                dy: torch.Tensor | None = None, no_grad: bool = False) -> dict:
        """``no_grad`` runs the forward under ``torch.no_grad()`` (torch's modules choose batch or
        running statistics by ``module.training`` alone, whatever the grad mode)."""
        m = self.modules[h]
        xin = self._input(x, layout, requires_grad=dy is not None and x.is_floating_point())
        before = _snapshot(xin)
        if no_grad and dy is not None:
            raise ValueError("forward: no gradient can be taken under no_grad")
        no_grad = no_grad or (self.eval_no_grad and dy is None and not getattr(m, "training", True))
        with torch.no_grad() if no_grad else _nothing():
            y = m(xin)
        if not isinstance(y, torch.Tensor):
            raise WrongOutput(f"forward returned {_what(y)}, not a torch.Tensor")
        out: dict = {"y": y}
        if dy is not None:
            params = self._params(m)
            inputs = [xin, *params.values()]
            if y.shape != xin.shape:
                raise WrongOutput(f"forward returned shape {tuple(y.shape)} for an input of shape "
                                  f"{tuple(xin.shape)}: no gradient can be taken")
            if not y.requires_grad:
                raise WrongOutput("output does not require grad although the input does (no autograd graph)")
            grads = torch.autograd.grad(y, inputs, apply_layout(dy.to(self.device), layout), allow_unused=True)
            out["grads"] = dict(zip(["x", *params.keys()], grads))
        out["input_modified"] = _snapshot(xin) != before
        out["state"] = self._state(m)
        return out

    def time_forward(self, dims: int, shape: list[int], dtype: str, layout: str, training: bool,
                     min_run_time: float, threads: int | None = None) -> dict:
        """Median time of one forward of a fresh module (in ``dtype``) on seeded data, no autograd."""
        from bnspec.report.timing import sample_input, time_callable

        if threads:
            torch.set_num_threads(threads)

        m = self.modules[self.construct(dims, shape[1], {"dtype": dtype})]
        m.train(bool(training))
        x = apply_layout(sample_input(tuple(shape), dtype, str(self.device)), layout)
        with torch.no_grad():
            m(x)  # warm-up outside the timing: first-call allocation, lazy initialisation
            return time_callable(lambda: m(x), min_run_time=min_run_time)

    def double_backward(self, h: int, x: torch.Tensor, layout: str, dy: torch.Tensor,
                        v: dict[str, torch.Tensor]) -> dict:
        """d/d(x, params, dy) of sum(v_x * dx) + sum(v_w * dw) + sum(v_b * db)."""
        m = self.modules[h]
        xin = self._input(x, layout, requires_grad=True)
        g = apply_layout(dy.to(self.device), layout).requires_grad_(True)
        y = m(xin)
        if not isinstance(y, torch.Tensor):
            raise WrongOutput(f"forward returned {_what(y)}, not a torch.Tensor")
        if y.shape != xin.shape:
            raise WrongOutput(f"forward returned shape {tuple(y.shape)} for an input of shape "
                              f"{tuple(xin.shape)}: no gradient can be taken")
        params = self._params(m)
        inputs = [xin, *params.values()]
        first = torch.autograd.grad(y, inputs, g, create_graph=True, allow_unused=True)
        names = ["x", *params.keys()]
        total = sum((gi * v[n].to(self.device)).sum() for n, gi in zip(names, first) if gi is not None and n in v)
        if not isinstance(total, torch.Tensor) or not total.requires_grad:
            raise WrongOutput("first-order gradients carry no graph: double backward is not available")
        second = torch.autograd.grad(total, [*inputs, g], allow_unused=True)
        return {"first": dict(zip(names, first)), "second": dict(zip([*names, "dy"], second))}


@contextlib.contextmanager
def _nothing():
    yield


def _exc_text(exc: BaseException) -> str:
    try:
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''}"
    except BaseException:  # noqa: BLE001 - a hostile __str__
        return "an exception"


def _probe(build: Callable) -> str | None:
    """None when ``build()`` returns a module, else why not."""
    try:
        m = build()
    except BaseException as exc:  # noqa: BLE001 - candidate code
        return _exc_text(exc)
    return None if m is not None else "nothing (None)"


def _cumulative_probe(factory: Callable, dims: int) -> str | None:
    """momentum=None is torch's cumulative average: a constructor that stores None but whose
    training forward then fails (``(1 - None) * ...``) while the default one works does not
    have it. Only this keyword is probed with a forward: it is a feature a layer may lack,
    not a value it may get wrong."""
    shape = (3, 4, *([2] * dims)) if dims > 1 else (3, 4, 2)

    def step(**kwargs) -> None:
        m = factory(4, **kwargs)
        m.train()
        m(torch.randn(shape, generator=torch.Generator().manual_seed(0)))

    try:
        step()
    except BaseException:  # noqa: BLE001 - no forward works: that is for the clauses to report
        return None
    try:
        step(momentum=None)
    except BaseException as exc:  # noqa: BLE001 - candidate code
        return f"{_factory_name(factory)}(4, momentum=None) is built, but its training forward raised {_exc_text(exc)}"
    return None


def _factory_name(factory: Any) -> str:
    name = getattr(factory, "__name__", None)
    return name if isinstance(name, str) else "the factory"


def _instance_pieces(m: Any) -> dict:
    """None for each piece of torch's module contract that ``m`` has, else what is missing."""

    def named(method: str) -> dict:
        try:
            return dict(getattr(m, method)())
        except BaseException:  # noqa: BLE001
            return {}

    params, buffers = named("named_parameters"), named("named_buffers")
    out = {}
    for name in ("weight", "bias"):
        out[f"{name} parameter"] = None if name in params else (
            f"{name} is not an nn.Parameter" if hasattr(m, name) else f"no attribute {name!r}")
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        out[f"{name} buffer"] = None if name in buffers else (
            f"{name} is not a registered buffer" if hasattr(m, name) else f"no attribute {name!r}")
    for name in ("reset_running_stats", "reset_parameters", "state_dict", "load_state_dict"):
        out[name] = None if callable(getattr(m, name, None)) else f"no method {name}()"
    ok = all(callable(getattr(m, n, None)) for n in ("train", "eval")) and isinstance(getattr(m, "training", None), bool)
    out["train/eval"] = None if ok else "no train()/eval() methods with a training flag"
    return out


def _what(obj: Any) -> str:
    """``None``, ``a tuple``, ``a numpy.ndarray``: what a candidate returned."""
    if obj is None:
        return "None"
    t = type(obj)
    name = t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"
    return f"a {name}"


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()


def _snapshot(t: torch.Tensor) -> bytes:
    plain = t.detach()
    if type(plain) is not torch.Tensor:
        plain = plain.as_subclass(torch.Tensor)
    # contiguous_format, not .contiguous(): a one-element view with a stride other than 1
    # counts as contiguous and cannot be viewed as bytes.
    plain = plain.cpu().clone(memory_format=torch.contiguous_format)
    return plain.reshape(-1).view(torch.uint8).numpy().tobytes() if plain.numel() else b""
