"""The Keras 3 candidates (``keras-jax``, ``keras-torch``, ``keras-numpy``, ``keras-tensorflow``),
TensorFlow's fused kernel (``tf-fused``) and PaddlePaddle's (``paddle-cpu``) translate torch's
conventions and nothing more.

Keras picks its backend once per process (``KERAS_BACKEND`` before the first import), so each
backend is checked in a child process of its own, driven like tests/test_adapters.py drives
the other adapters (``Driver``, ``check_*``) and compared with :mod:`bnspec.reference` on what
the adapter TRANSLATES: the channel axis, the train/eval switch (Keras runs inference when
``training`` is not passed), the momentum convention (and momentum=None's factor), eps (Keras's
default is 1e-3, torch's 1e-5), affine/bias/track switches. What Keras does differently is
asserted to come through unchanged: the biased running variance, float64 computed in
float32 (not on the tensorflow backend), one-pass variance on the torch and numpy backends, NaN statistics for an empty
batch, no error for one value per channel, and on the tensorflow backend second-order
gradients without the path through the mean inside the variance (tf.nn.moments's
stop_gradient; first-order gradients are right).

tf-fused is checked in float32 (TensorFlow's kernel has no float64): values at 1e-5 and
gradients at 1e-4 as for Keras; its running variance is torch's UNBIASED one and its factor
runs in torch's direction, so the running statistics are compared with torch's formula at
1e-6.

Tolerances: Keras computes every dtype in float32 (``result_type(dtype, "float32")``), so
values are compared at 1e-5 (a few float32 ulps of O(1) values on these small inputs), the
running statistics at 1e-6 (O(1) values blended once or twice), gradients at 1e-4 (float32
gradients of a normalization, measured at up to 8e-6).

Paddle is checked the same way (in a child, for the HOME check): it computes float64 in
float64, but its operator attributes momentum and epsilon are float32, so the running
statistics are compared at 1e-7 (0.9 is 0.899999976 in float32, times O(1) differences)
and eval outputs at 1e-9 (eps 1e-3 is 1.00000005e-3 in float32, divided by var + eps).

The child runs with HOME pointed at an empty folder, which must stay empty: the adapters
keep Keras's keras.json, matplotlib's font cache and Paddle's dataset folder out of the
home directory.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bnspec.candidates.targets import BUILTINS

HERE = Path(__file__).resolve().parent
BACKEND_MODULES = {"jax": "jax", "torch": "torch", "numpy": "numpy", "tensorflow": "tensorflow"}
NAMES = [f"keras-{b}" for b in BACKEND_MODULES]
MODULES = {**{f"keras-{b}": ("keras", m) for b, m in BACKEND_MODULES.items()}, "paddle-cpu": ("paddle",),
           "tf-fused": ("tensorflow",)}


def need(name: str) -> None:
    """Skip when the framework (for Keras: also the backend's) is not installed."""
    extra = BUILTINS[name].extra
    for module in MODULES[name]:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"not installed: {module} (pip install 'bnspec[{extra}]')")


# ----------------------------------------------------------------------------- in the child

def child_checks(name: str) -> None:
    """Every check of one candidate; runs in a fresh process (see :func:`test_candidate`)."""
    if name == "paddle-cpu":
        paddle_checks(name)
    elif name == "tf-fused":
        tf_fused_checks(name)
    else:
        keras_checks(name)


def keras_checks(name: str) -> None:
    import torch
    from test_adapters import (SHAPES, Driver, R, _close, _params, _values, check_backward, check_eval_forward,
                               check_layout, check_running_update, check_switches, check_train_forward)

    from bnspec import conventions

    backend = name.partition("-")[2]
    dims_list = (1, 2) if backend == "jax" else (1, 2, 3)  # jax compiles per shape: keep it short
    for dims in dims_list:
        # Translated: axis, train/eval, eps (torch's 1e-5 here, not Keras's 1e-3), switches.
        check_train_forward(name, dims, dtype=torch.float32, tol=1e-5)
        check_eval_forward(name, dims, dtype=torch.float32, tol=1e-5)
        check_switches(name, dims, tol=1e-5)
        # Momentum direction translated (new = (1-f) old + f batch with torch's f, also f = 1/t
        # for momentum=None); the variance in the running average is Keras's BIASED one.
        check_running_update(name, dims, 0.1, convention="biased_running_var", tol=1e-6)
        check_running_update(name, dims, None, convention="biased_running_var", tol=1e-6, steps=3)
        try:  # torch's unbiased update differs by f * var / (n - 1), far above the tolerance
            check_running_update(name, dims, 0.1, convention=None, tol=1e-6)
        except AssertionError:
            pass
        else:
            raise AssertionError(f"{name}: running variance is unbiased; the Keras convention was patched away")
        if backend != "numpy":
            check_backward(name, dims, training=True, tol=1e-4)
            check_backward(name, dims, training=False, tol=1e-4)
    check_layout(name)

    # eps reaches Keras: with eps=0.5 on unit-variance data the output differs by ~20 %
    # from eps=1e-5, so a dropped eps cannot pass 1e-5.
    x = _values(SHAPES[2], torch.float32, seed=6)
    out = Driver(name, 2, dtype="float32", eps=0.5).forward(x)
    _close(out["y"], R.train_forward(x, eps=0.5, mode="oracle").y, 1e-5)

    # float64 is computed in float32 (Keras's promotion), the result cast back to float64:
    # the error is a float32 rounding error, never a float64 one. The tensorflow backend's
    # promotion keeps float64 (measured, Keras 3.15 with TensorFlow 2.21).
    x = _values(SHAPES[2], torch.float64, seed=7)
    y = Driver(name, 2, dtype="float64").forward(x)["y"]
    err = (y - R.train_forward(x, eps=1e-5, mode="oracle").y).abs().max().item()
    if backend == "tensorflow":
        assert y.dtype == torch.float64 and err < 1e-12, f"float64 error {err:.3g}: not float64 arithmetic"
    else:
        assert y.dtype == torch.float64 and 1e-9 < err < 1e-5, f"float64 error {err:.3g}: not float32 arithmetic"
    if backend == "jax":  # two-pass in float32: exactly the named convention, to float32 rounding
        alt = conventions.train_forward_alternatives(x, None, None, eps=1e-5)["float32_for_float64"]
        _close(y, alt, 1e-6)

    # The variance: one-pass E[x^2]-E[x]^2 on torch and numpy, two-pass jnp.var on jax and
    # tf.nn.moments on tensorflow. At a large offset one-pass float32 loses more than 1000x the
    # accuracy of torch's two-pass.
    x = _values((8, 3, 4, 4), torch.float32, offset=300.0)
    oracle = R.train_forward(x, eps=1e-5, mode="oracle").y
    keras_err = (Driver(name, 2, dtype="float32").forward(x)["y"].double() - oracle).abs().max().item()
    torch_err = (torch.nn.BatchNorm2d(3)(x).detach().double() - oracle).abs().max().item()
    if backend in ("jax", "tensorflow"):
        assert keras_err < 10 * torch_err, (keras_err, torch_err)
    else:
        assert keras_err > 100 * torch_err, (keras_err, torch_err)

    # Kept: NaN statistics for an empty batch (the counter still counts), no error for one
    # value per channel (Keras normalizes it to zeros).
    d = Driver(name, 2, dtype="float32")
    out = d.forward(torch.zeros(0, 3, 2, 2))
    assert out["y"].shape == (0, 3, 2, 2)
    assert torch.isnan(out["state"]["running_mean"]).all() and int(out["state"]["num_batches_tracked"]) == 1
    y = Driver(name, 2, dtype="float32").forward(torch.ones(1, 3, 1, 1))["y"]
    assert torch.equal(y, torch.zeros(1, 3, 1, 1))

    # The layer's dtype policy decides the output dtype: float16 input, float32 layer -> float32.
    y = Driver(name, 2, dtype="float32").forward(_values(SHAPES[2], torch.float16))["y"]
    assert y.dtype == torch.float32

    # Statistics in the layer's dtype as Keras creates them; the numpy backend's variables
    # declared float64 hold float32 values until first assigned (measured, Keras 3.15).
    state = Driver(name, 2, dtype="float64").state()
    want = torch.float32 if backend == "numpy" else torch.float64
    assert state["running_var"].dtype == want and state["weight"].dtype == want

    caps = Driver(name, 1).adapter.capabilities
    assert caps.backward == caps.double_backward == (backend != "numpy")
    assert not caps.module_contract and caps.errors and caps.cumulative
    if backend == "numpy":
        d = Driver(name, 2, dtype="float32")
        x = _values(SHAPES[2], torch.float32)
        try:
            d.forward(x, dy=x)
        except NotImplementedError:
            pass
        else:
            raise AssertionError("keras-numpy answered a backward it does not declare")
    else:  # second order through the backend's autodiff, against torch's module
        p = _params(3)
        d = Driver(name, 2, dtype="float64")
        d.set(**p)
        x, dy = _values(SHAPES[2], seed=3), _values(SHAPES[2], seed=4, offset=0.2)
        v = {"x": _values(SHAPES[2], seed=5), "weight": torch.linspace(-1, 1, 3, dtype=torch.float64)}
        got = d.adapter.double_backward(d.h, x, "contiguous", dy, v)
        first_x, second = _second_order(p, x, dy, v)
        _close(got["first"]["x"], first_x, 1e-4)
        if backend == "tensorflow":  # the stop_gradient convention, not torch's second order
            err = (got["second"]["x"].double() - second[0]).abs().max().item()
            assert err > 1e-2, f"keras-tensorflow's second order matches torch's ({err:.3g}): convention gone?"
            second = _second_order(p, x, dy, v, conventions.stop_gradient_variance_forward)[1]
        for k, want in zip(("x", "weight", "dy"), second):
            _close(got["second"][k], want, 1e-4)
    # The adapter never imported another backend into this process, and a second Keras
    # backend is refused here (exit 2) instead of silently running this one.
    import keras

    from bnspec.candidates.targets import UnusableTarget, load_adapter

    assert keras.backend.backend() == backend
    other = next(b for b in BACKEND_MODULES if b != backend)
    try:
        load_adapter(f"keras-{other}", dims=2)
    except UnusableTarget as exc:
        assert "already imported" in str(exc), exc
    else:
        raise AssertionError(f"keras-{other} loaded in a process whose Keras runs the {backend} backend")


def _second_order(p: dict, x, dy, v: dict, forward=None) -> tuple:
    """(first-order dx, d(sum v.grads)/d(x, weight, dy)) by torch autograd through
    ``forward(x, weight, bias, eps=1e-5)`` with ``p``'s weight and bias; by default torch's
    batch norm with batch statistics (what a training-mode module computes)."""
    import torch

    xr, g = x.clone().requires_grad_(True), dy.clone().requires_grad_(True)
    w, b = p["weight"].clone().requires_grad_(True), p["bias"].clone().requires_grad_(True)
    if forward is None:
        y = torch.nn.functional.batch_norm(xr, None, None, w, b, training=True, eps=1e-5)
    else:
        y = forward(xr, w, b, eps=1e-5)
    first = torch.autograd.grad(y, [xr, w], g, create_graph=True)
    second = torch.autograd.grad((first[0] * v["x"]).sum() + (first[1] * v["weight"]).sum(), [xr, w, g])
    return first[0].detach(), second


def tf_fused_checks(name: str) -> None:
    import torch
    from test_adapters import (SHAPES, Driver, R, _close, _params, _values, check_backward, check_eval_forward,
                               check_layout, check_running_update, check_switches, check_train_forward)

    f32 = torch.float32
    for dims in (2, 3):
        check_train_forward(name, dims, dtype=f32, tol=1e-5)
        check_eval_forward(name, dims, dtype=f32, tol=1e-5)
        check_switches(name, dims, dtype=f32, tol=1e-5)
        # TF's factor runs in torch's direction with torch's unbiased variance: torch's formula.
        check_running_update(name, dims, 0.1, convention=None, tol=1e-6, dtype=f32)
        check_running_update(name, dims, None, convention=None, tol=1e-6, steps=3, dtype=f32)
        check_backward(name, dims, training=True, tol=1e-4, dtype=f32)
        check_backward(name, dims, training=False, tol=1e-4, dtype=f32)
    check_layout(name)

    # eps reaches TF (its default is 1e-3).
    x = _values(SHAPES[2], f32, seed=6)
    _close(Driver(name, 2, dtype="float32", eps=0.5).forward(x)["y"], R.train_forward(x, eps=0.5, mode="oracle").y,
           1e-5)
    # Declared and true: BatchNorm2d/3d only, no float64, TF's own errors come through.
    d = Driver(name, 2, dtype="float32")
    caps = d.adapter.capabilities
    assert d.adapter.dims_provided == (2, 3) and "float64" not in caps.dtypes and caps.ranks == (4, 5)
    for bad in (torch.ones(2, 3, 2), _values(SHAPES[2])):  # 3-D input; float64 input
        try:
            d.forward(bad)
        except Exception as exc:  # noqa: BLE001 - TF's InvalidArgumentError
            assert type(exc).__name__ == "InvalidArgumentError", exc
        else:
            raise AssertionError(f"tf-fused accepted a {bad.dim()}-D {bad.dtype} input")
    # Half parameters are widened for TF's float32-only parameter type and rounded back:
    # the statistics keep the module's dtype and match torch's float16 module.
    for dt in (torch.float16, torch.bfloat16):
        d = Driver(name, 2, dtype=str(dt).replace("torch.", ""))
        x = _values(SHAPES[2], dt, seed=2)
        out = d.forward(x)
        m = torch.nn.BatchNorm2d(3, dtype=dt)
        y = m(x)
        assert out["y"].dtype == dt and out["state"]["running_var"].dtype == dt
        ulp = 1e-2 if dt == torch.float16 else 1e-1  # one or two roundings of O(1) values in 10/7 bits
        _close(out["y"], y.detach(), ulp)
        _close(out["state"]["running_var"], m.running_var, ulp)
    # Kept: NaN statistics for an empty batch (the counter still counts), no error for one
    # value per channel (the output is the offset; the statistics blend in a zero variance).
    d = Driver(name, 2, dtype="float32")
    p = d.set(**_params(3, f32))
    out = d.forward(torch.zeros(0, 3, 2, 2))
    assert out["y"].shape == (0, 3, 2, 2)
    assert torch.isnan(out["state"]["running_mean"]).all() and int(out["state"]["num_batches_tracked"]) == 1
    d = Driver(name, 2, dtype="float32")
    p = d.set(**_params(3, f32))
    out = d.forward(torch.ones(1, 3, 1, 1))
    _close(out["y"].reshape(3), p["bias"], 1e-6)
    _close(out["state"]["running_var"], 0.9 * p["running_var"], 1e-6)
    # Second order through nested tapes, against torch's float32 batch norm.
    d = Driver(name, 2, dtype="float32")
    p = d.set(**_params(3, f32))
    x, dy = _values(SHAPES[2], f32, seed=3), _values(SHAPES[2], f32, seed=4, offset=0.2)
    v = {"x": _values(SHAPES[2], f32, seed=5), "weight": torch.linspace(-1, 1, 3)}
    got = d.adapter.double_backward(d.h, x, "contiguous", dy, v)
    first_x, second = _second_order(p, x, dy, v)
    _close(got["first"]["x"], first_x, 1e-4)
    for k, want in zip(("x", "weight", "dy"), second):
        _close(got["second"][k], want, 1e-3)  # second order of float32 values of size ~10


def paddle_checks(name: str) -> None:
    import torch
    from test_adapters import (SHAPES, Driver, R, _close, _params, _values, check_backward, check_eval_forward,
                               check_layout, check_running_update, check_switches, check_train_forward)

    for dims in (1, 2, 3):
        check_train_forward(name, dims, tol=1e-12)  # float64 in float64
        check_train_forward(name, dims, dtype=torch.float32, tol=1e-5)
        check_eval_forward(name, dims, tol=1e-9)  # float32 epsilon attribute (module docstring)
        check_switches(name, dims, tol=1e-11)
        # Momentum direction translated; Paddle's running variance is the BIASED one.
        check_running_update(name, dims, 0.1, convention="biased_running_var", tol=1e-7)
        check_running_update(name, dims, None, convention="biased_running_var", tol=1e-7, steps=3)
        try:
            check_running_update(name, dims, 0.1, convention=None, tol=1e-7)
        except AssertionError:
            pass
        else:
            raise AssertionError("paddle-cpu: running variance is unbiased; the Paddle convention was patched away")
        check_backward(name, dims, training=True)
        check_backward(name, dims, training=False)
    check_layout(name)

    # eps reaches Paddle (0.5 is exact in float32).
    x = _values(SHAPES[2], seed=6)
    _close(Driver(name, 2, dtype="float64", eps=0.5).forward(x)["y"], R.train_forward(x, eps=0.5, mode="oracle").y,
           1e-12)
    # Paddle's own rank check comes through (BatchNorm2D wants 4-D input).
    try:
        Driver(name, 2).forward(torch.ones(2, 3, 2))
    except ValueError as exc:
        assert "4D" in str(exc), exc
    else:
        raise AssertionError("paddle-cpu: no rank error from BatchNorm2D")
    # Kept: a batch of one value per channel comes back unchanged (measured, Paddle 3.3: its
    # CPU kernel skips it), no error, the statistics untouched; the counter still counts.
    d = Driver(name, 2, dtype="float64")
    p = d.set(**_params(3))
    x = _values((1, 3, 1, 1), seed=8)
    out = d.forward(x)
    assert torch.equal(out["y"], x)
    assert torch.equal(out["state"]["running_mean"], p["running_mean"])
    assert int(out["state"]["num_batches_tracked"]) == 1
    # No half precision on the CPU: declared, and Paddle's kernel indeed refuses it.
    caps = d.adapter.capabilities
    assert caps.dtypes == ("float64", "float32") and caps.backward and caps.double_backward
    try:
        Driver(name, 2, dtype="float16").forward(_values(SHAPES[2], torch.float16))
    except RuntimeError as exc:
        assert "float16" in str(exc), exc
    else:
        raise AssertionError("paddle-cpu ran a float16 batch norm on the CPU: widen its declared dtypes")
    # Kept: without a bias (bias_attr=False) Paddle gives the weight no gradient (measured,
    # Paddle 3.3.1). Its own layer and .backward() do it too, so the adapter's None in
    # dweight (S4.1-S4.3 in the report) is Paddle's, not the adapter's.
    import paddle

    p, x, dy = _params(3), _values(SHAPES[2], seed=3), _values(SHAPES[2], seed=4, offset=0.2)
    want_dx = R.train_backward(dy, x, p["weight"], mode="oracle").dx
    old_dtype = paddle.get_default_dtype()
    paddle.set_default_dtype("float64")
    try:
        layer = paddle.nn.BatchNorm2D(3, bias_attr=False)
    finally:
        paddle.set_default_dtype(old_dtype)
    layer.weight.set_value(p["weight"].numpy())
    layer.train()
    px = paddle.to_tensor(x.numpy(), stop_gradient=False)
    (layer(px) * paddle.to_tensor(dy.numpy())).sum().backward()
    _close(torch.from_numpy(px.grad.numpy()), want_dx, 1e-10)  # float64 values of size ~1
    assert layer.weight.grad is None, "Paddle now gives the weight a gradient without a bias: update the note"
    d = Driver(name, 2, dtype="float64", bias=False)
    d.set(weight=p["weight"])
    d.train(True)
    grads = d.forward(x, dy=dy)["grads"]
    _close(grads["x"], want_dx, 1e-10)  # float64 values of size ~1
    assert grads.get("weight") is None, grads.get("weight")

    # Second order through paddle.grad, against torch's module.
    p = _params(3)
    d = Driver(name, 2, dtype="float64")
    d.set(**p)
    x, dy = _values(SHAPES[2], seed=3), _values(SHAPES[2], seed=4, offset=0.2)
    v = {"x": _values(SHAPES[2], seed=5), "weight": torch.linspace(-1, 1, 3, dtype=torch.float64)}
    got = d.adapter.double_backward(d.h, x, "contiguous", dy, v)
    first_x, second = _second_order(p, x, dy, v)
    _close(got["first"]["x"], first_x, 1e-10)
    for k, want in zip(("x", "weight", "dy"), second):
        _close(got["second"][k], want, 1e-10)


# ----------------------------------------------------------------------------- the tests

_CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, {here!r})
    import test_adapters_keras
    test_adapters_keras.child_checks({name!r})
    print("CHECKS-DONE")
""")
CANDIDATES = [*NAMES, "paddle-cpu", "tf-fused"]


@pytest.fixture(scope="module")
def children(tmp_path_factory):
    """Every installed candidate's child process, all started at once (they run side by
    side: most of each one's time is importing its framework), each with an empty HOME."""
    started = {}
    for name in CANDIDATES:
        if any(importlib.util.find_spec(m) is None for m in MODULES[name]):
            continue
        folder = tmp_path_factory.mktemp(name)
        home = folder / "home"
        home.mkdir()
        env = {k: v for k, v in os.environ.items()
               if k not in ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "MPLCONFIGDIR", "KERAS_HOME", "KERAS_BACKEND")}
        env["HOME"] = str(home)
        out, err = open(folder / "stdout", "w"), open(folder / "stderr", "w")  # files: no pipe to fill up
        proc = subprocess.Popen([sys.executable, "-c", _CHILD.format(here=str(HERE), name=name)], env=env,
                                stdout=out, stderr=err, cwd=str(HERE.parent))
        started[name] = (proc, folder, (out, err))
    yield started
    for proc, _, files in started.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for f in files:
            f.close()


@pytest.mark.parametrize("name", CANDIDATES)
def test_candidate(name, children):
    """All checks of one candidate in a fresh process with an empty HOME, which stays empty."""
    need(name)
    proc, folder, _ = children[name]
    try:
        proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    stdout, stderr = (folder / "stdout").read_text(), (folder / "stderr").read_text()
    assert proc.returncode == 0 and "CHECKS-DONE" in stdout, stderr[-6000:]
    home = folder / "home"
    assert sorted(str(p.relative_to(home)) for p in home.rglob("*")) == []


def test_builtins_are_registered():
    for name in NAMES:
        b = BUILTINS[name]
        assert b.extra == ("tensorflow" if name == "keras-tensorflow" else "keras")
        assert b.loader.startswith("bnspec.candidates.keras_adapter:")
    assert BUILTINS["paddle-cpu"].extra == "paddle"
    assert BUILTINS["tf-fused"].extra == "tensorflow"
