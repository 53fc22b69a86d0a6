"""The built-in adapters of other BatchNorms translate torch's conventions and nothing more.

Each adapter is driven in this process through the same operations the suite's child
process uses (``construct``, ``set_state``, ``forward`` ...) and compared with
:mod:`bnspec.reference` on what it TRANSLATES: the channel axis, the train/eval switch,
the momentum convention (and momentum=None's factor), eps, affine/bias/track switches.
What a framework does differently is asserted to come through unchanged (Flax's biased
running variance and float32 statistics, ONNX's biased running variance, NumPy's NaN
statistics for an empty batch): an adapter must never patch it away.

Frameworks that are optional extras are skipped when not installed. None of these tests
writes into the home directory (one of them checks that in a subprocess).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from bnspec import conventions
from bnspec import reference as R
from bnspec.candidates.targets import BUILTINS, describe_builtins, load_adapter

SHAPES = {1: (6, 3), 2: (4, 3, 3, 2), 3: (2, 3, 2, 2, 3)}
OPTIONAL = {"flax-linen": "flax", "flax-nnx": "flax", "onnx-reference": "onnx", "onnxruntime": "onnxruntime",
            "tinygrad": "tinygrad", "mlx": "mlx"}


def need(name: str):
    """The adapter module for built-in ``name``, or skip (framework not installed).

    The ADAPTER imports the framework (never this test first): onnxruntime and tinygrad
    must be imported the adapter's way to keep their caches out of the home directory."""
    extra = BUILTINS[name].extra
    if importlib.util.find_spec(OPTIONAL[name]) is None:
        pytest.skip(f"not installed: pip install 'bnspec[{extra}]'")
    module = BUILTINS[name].loader.partition(":")[0]
    return pytest.importorskip(module, reason=f"not installed: pip install 'bnspec[{extra}]'")


def _values(shape, dtype=torch.float64, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    pc = (1, c, *([1] * (len(shape) - 2)))
    x = torch.randn(shape, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2, c).reshape(pc)
    return (x + torch.linspace(-1, 1, c).reshape(pc) + offset).to(dtype)


def _params(c, dtype=torch.float64):
    w = torch.linspace(0.5, 1.5, c, dtype=torch.float64) * torch.tensor([1.0, -1.0] * c)[:c].double()
    b = torch.linspace(-0.3, 0.4, c, dtype=torch.float64)
    rm = torch.linspace(-1, 1, c, dtype=torch.float64)
    rv = torch.linspace(0.5, 2, c, dtype=torch.float64)
    return {k: v.to(dtype) for k, v in dict(weight=w, bias=b, running_mean=rm, running_var=rv).items()}


class Driver:
    """One in-process adapter and one module handle on it."""

    def __init__(self, name: str, dims: int, **kwargs) -> None:
        self.adapter = load_adapter(name, dims=dims)
        self.h = self.adapter.construct(dims, SHAPES[dims][1], kwargs)

    def set(self, **values):
        return _copy(self.adapter.set_state(self.h, values))

    def train(self, flag: bool = True):
        self.adapter.set_training(self.h, flag)

    def forward(self, x, layout="contiguous", dy=None):
        out = self.adapter.forward(self.h, x, layout, dy)
        return {**out, "state": _copy(out["state"])}

    def state(self):
        return _copy(self.adapter.describe(self.h)["state"])


def _copy(state: dict) -> dict:
    """A snapshot (in the child, the wire copies; here the adapter's tensors are live)."""
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def _close(got, want, tol):
    assert got.shape == want.shape
    err = (got.double() - want.double()).abs().max().item() if got.numel() else 0.0
    assert err <= tol, f"max error {err:.3g} > {tol:.3g}"


# ----------------------------------------------------------------------------- shared checks

def check_train_forward(name, dims, tol=1e-12, dtype=torch.float64, layout="contiguous"):
    d = Driver(name, dims, dtype=str(dtype).replace("torch.", ""))
    p = _params(SHAPES[dims][1], dtype)
    d.set(weight=p["weight"], bias=p["bias"])
    x = _values(SHAPES[dims], dtype)
    out = d.forward(x, layout)
    want = R.train_forward(x, p["weight"], p["bias"], eps=1e-5, mode="oracle").y
    _close(out["y"], want, tol)
    assert out["y"].dtype == dtype and not out["input_modified"]
    return out


def check_eval_forward(name, dims, tol=1e-12, dtype=torch.float64):
    d = Driver(name, dims, dtype=str(dtype).replace("torch.", ""), eps=1e-3)
    p = _params(SHAPES[dims][1], dtype)
    state = d.set(**p)  # read back: a framework may keep statistics in its own dtype
    d.train(False)
    x = _values(SHAPES[dims], dtype, seed=1)
    out = d.forward(x)
    want = R.eval_forward(x, state["running_mean"], state["running_var"], state["weight"], state["bias"],
                          eps=1e-3, mode="oracle")
    _close(out["y"], want, tol)
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(out["state"][k], state[k]), f"eval changed {k}"


def check_running_update(name, dims, momentum, *, convention: str | None, tol=1e-12, steps=2,
                         dtype=torch.float64):
    """After ``steps`` training steps the statistics follow torch's blend (convention None)
    or the named convention of :mod:`bnspec.conventions`, with torch's factor."""
    d = Driver(name, dims, dtype=str(dtype).replace("torch.", ""), momentum=momentum)
    state = d.set(**_params(SHAPES[dims][1], dtype))
    for k in range(steps):
        x = _values(SHAPES[dims], dtype, seed=10 + k)
        out = d.forward(x)
        mean, var = R.batch_stats(x, mode="oracle")
        n = x.numel() // x.shape[1]
        count = int(state["num_batches_tracked"]) + 1
        factor = momentum if momentum is not None else 1.0 / count
        if convention is None:
            want = R.update_running_stats(state["running_mean"].double(), state["running_var"].double(),
                                          state["num_batches_tracked"], mean, var, n, momentum=momentum)[:2]
        else:
            want = conventions.running_alternatives(state["running_mean"], state["running_var"], mean, var, n,
                                                    factor)[convention]
        _close(out["state"]["running_mean"], want[0], tol)
        _close(out["state"]["running_var"], want[1], tol)
        assert int(out["state"]["num_batches_tracked"]) == count
        state = out["state"]


def check_backward(name, dims, tol=1e-10, training=True, dtype=torch.float64):
    d = Driver(name, dims, dtype=str(dtype).replace("torch.", ""))
    p = _params(SHAPES[dims][1], dtype)
    d.set(**p)
    d.train(training)
    x = _values(SHAPES[dims], dtype, seed=3)
    dy = _values(SHAPES[dims], dtype, seed=4, offset=0.2)
    out = d.forward(x, dy=dy)
    if training:
        want = R.train_backward(dy, x, p["weight"], eps=1e-5, mode="oracle")
    else:
        want = R.eval_backward(dy, x, p["running_mean"], p["running_var"], p["weight"], eps=1e-5, mode="oracle")
    g = out["grads"]
    _close(g["x"], want.dx, tol)
    _close(g["weight"], want.dweight, tol)
    _close(g["bias"], want.dbias, tol)


def check_torch_formulas(name, dims):
    """Forward (train, eval), running updates (momentum 0.1 and None) and gradients (train,
    eval) in float64 at the default tolerances: for frameworks that compute torch's formulas."""
    check_train_forward(name, dims)
    check_eval_forward(name, dims)
    check_running_update(name, dims, 0.1, convention=None)
    check_running_update(name, dims, None, convention=None, steps=3)
    check_backward(name, dims, training=True)
    check_backward(name, dims, training=False)


def check_switches(name, dims, tol=1e-12, dtype=torch.float64):
    """affine=False / bias=False / track_running_stats=False translate to the framework's."""
    x = _values(SHAPES[dims], dtype, seed=5)
    dt = str(dtype).replace("torch.", "")
    d = Driver(name, dims, dtype=dt, affine=False)
    s = d.state()
    assert s["weight"] is None and s["bias"] is None
    _close(d.forward(x)["y"], R.train_forward(x, eps=1e-5, mode="oracle").y, tol)
    d = Driver(name, dims, dtype=dt, bias=False)
    assert d.state()["bias"] is None and d.state()["weight"] is not None
    d = Driver(name, dims, dtype=dt, track_running_stats=False)
    s = d.state()
    assert s["running_mean"] is None and s["num_batches_tracked"] is None
    d.train(False)  # no running statistics: eval normalizes with the batch's
    _close(d.forward(x)["y"], R.train_forward(x, eps=1e-5, mode="oracle").y, tol)


def check_layout(name):
    """Frameworks without strides give the result in the input's memory format (the
    translation of a torch-only concept), never the layout of the adapter's own transposes."""
    d = Driver(name, 2, dtype="float32")
    x = _values((2, 3, 4, 5), torch.float32)
    assert d.forward(x)["y"].is_contiguous()
    assert d.forward(x, "channels_last")["y"].is_contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- numpy

@pytest.mark.parametrize("dims", [1, 2, 3])
def test_numpy_matches_the_reference(dims):
    check_train_forward("numpy", dims)
    check_train_forward("numpy", dims, dtype=torch.float32, tol=1e-6)
    check_eval_forward("numpy", dims)
    check_running_update("numpy", dims, 0.1, convention=None)
    check_running_update("numpy", dims, None, convention=None, steps=3)
    check_backward("numpy", dims, training=True)
    check_backward("numpy", dims, training=False)
    check_switches("numpy", dims)


def test_numpy_is_a_correct_batchnorm_within_its_capabilities():
    """No bfloat16, no autograd, no module contract (declared); torch's errors and the
    empty batch handled as torch does."""
    a = load_adapter("numpy", dims=2)
    caps = a.capabilities
    assert "bfloat16" not in caps.dtypes and not caps.module_contract and not caps.double_backward
    assert caps.errors
    d = Driver("numpy", 2, dtype="float32")
    before = d.state()
    out = d.forward(torch.zeros(0, 3, 2, 2))
    assert out["y"].shape == (0, 3, 2, 2)
    assert torch.equal(out["state"]["running_mean"], before["running_mean"])  # an empty batch blends nothing
    assert int(out["state"]["num_batches_tracked"]) == 1
    for bad, error in ((torch.ones(1, 3, 1, 1), ValueError),          # one value per channel
                       (torch.ones(2, 3, 2), ValueError),             # a 3-D input to BatchNorm2d
                       (torch.ones(2, 4, 2, 2), RuntimeError),        # 4 channels to a module of 3
                       (torch.ones(2, 3, 2, 2, dtype=torch.int64), TypeError)):
        with pytest.raises(error):
            Driver("numpy", 2, dtype="float32").forward(bad)
    x = _values((3, 3, 4, 5), torch.float32).contiguous(memory_format=torch.channels_last)
    y = Driver("numpy", 2, dtype="float32").forward(x, "channels_last")["y"]
    assert y.is_contiguous(memory_format=torch.channels_last)  # NumPy keeps the input's strides
    with pytest.raises(NotImplementedError):
        d.adapter.double_backward(d.h, x, "contiguous", x, {"x": x})
    with pytest.raises(NotImplementedError):
        d.adapter.state_dict(d.h)


# ----------------------------------------------------------------------------- torch variants

def _torch_module(dims, **kw):
    return {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}[dims](3, **kw)


@pytest.mark.parametrize("name", ["torch-functional", "torch-channels-last"])
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_torch_variants_equal_torch(name, dims, momentum):
    """Same numbers as torch's module: output, statistics, counter, gradients, eval."""
    kw = dict(momentum=momentum, dtype=torch.float64)
    d = Driver(name, dims, **kw)
    ref = _torch_module(dims, **kw)
    p = _params(3)
    d.set(**p)
    with torch.no_grad():
        for k, v in p.items():
            getattr(ref, k).copy_(v)
    for step in range(2):
        x, dy = _values(SHAPES[dims], seed=step), _values(SHAPES[dims], seed=9 + step)
        out = d.forward(x, dy=dy)
        xr = x.clone().requires_grad_(True)
        yr = ref(xr)
        gx, gw, gb = torch.autograd.grad(yr, [xr, ref.weight, ref.bias], dy)
        _close(out["y"], yr, 1e-12)
        _close(out["grads"]["x"], gx, 1e-12)
        _close(out["grads"]["weight"], gw, 1e-12)
        _close(out["grads"]["bias"], gb, 1e-12)
        for k in ("running_mean", "running_var"):
            _close(out["state"][k], getattr(ref, k), 1e-14)
        assert torch.equal(out["state"]["num_batches_tracked"], ref.num_batches_tracked)
    d.train(False)
    ref.eval()
    x = _values(SHAPES[dims], seed=7)
    _close(d.forward(x)["y"], ref(x), 1e-12)


def test_torch_functional_keeps_the_module_contract():
    a = load_adapter("torch-functional", dims=2)
    h = a.construct(2, 3, {"bias": False})
    sd = a.state_dict(h)
    assert sd["keys"] == ["weight", "running_mean", "running_var", "num_batches_tracked"]
    with pytest.raises(ValueError, match="got 3D input"):
        a.forward(h, torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        a.forward(h, torch.randn(1, 3, 1, 1))


def test_torch_channels_last_output_is_channels_last():
    d = Driver("torch-channels-last", 2)
    y = d.forward(_values((2, 3, 4, 5), torch.float32))["y"]  # contiguous in
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("BNSPEC_SLOW") != "1",
                    reason="slow (a cold torch.compile takes 20-40 s): set BNSPEC_SLOW=1")
def test_torch_compile_matches_torch():
    d = Driver("torch-compile", 2, dtype=torch.float32)
    x = _values(SHAPES[2], torch.float32)
    out = d.forward(x)
    _close(out["y"], torch.nn.BatchNorm2d(3)(x), 1e-5)
    assert int(out["state"]["num_batches_tracked"]) == 1
    # torch.compile's OptimizedModule prefixes state_dict keys: the suite reports that (S5).
    assert d.adapter.state_dict(d.h)["keys"][0] == "_orig_mod.weight"


# ----------------------------------------------------------------------------- Flax

@pytest.mark.parametrize("name", ["flax-linen", "flax-nnx"])
@pytest.mark.parametrize("dims", [1, 2])
def test_flax_translates_axis_momentum_eps_and_mode(name, dims):
    need(name)
    check_train_forward(name, dims, tol=1e-12)
    check_train_forward(name, dims, dtype=torch.float32, tol=1e-5, layout="channels_last" if dims == 2 else
                        "contiguous")
    check_eval_forward(name, dims, tol=1e-6)
    check_backward(name, dims, training=True)
    check_backward(name, dims, training=False, tol=1e-6)
    check_switches(name, dims)
    check_layout(name)


@pytest.mark.parametrize("name", ["flax-linen", "flax-nnx"])
def test_flax_conventions_come_through(name):
    """Momentum translated (new = (1-f) old + f batch with torch's f, also f = 1/t for
    momentum=None), biased variance in the running average and float32 statistics kept."""
    need(name)
    check_running_update(name, 2, 0.1, convention="biased_running_var", tol=1e-6)
    check_running_update(name, 2, None, convention="biased_running_var", tol=1e-6, steps=3)
    d = Driver(name, 2, dtype="float64")
    assert d.state()["running_var"].dtype == torch.float32  # Flax creates its statistics in float32
    caps = d.adapter.capabilities
    assert caps.double_backward and not caps.module_contract and "bfloat16" in caps.dtypes


def test_flax_one_pass_variance_shows():
    """Flax's default use_fast_variance=True: at a large offset its float32 output is far
    less accurate than a two-pass float32 BatchNorm (torch's), i.e. it was not patched."""
    need("flax-linen")
    x = _values((8, 3, 4, 4), torch.float32, offset=300.0)
    oracle = R.train_forward(x, eps=1e-5, mode="oracle").y
    flax_err = (Driver("flax-linen", 2, dtype="float32").forward(x)["y"].double() - oracle).abs().max()
    torch_err = (torch.nn.BatchNorm2d(3)(x).detach().double() - oracle).abs().max()
    assert flax_err > 10 * torch_err


# ----------------------------------------------------------------------------- ONNX

@pytest.mark.parametrize("name", ["onnx-reference", "onnxruntime"])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_onnx_translates_mode_momentum_and_eps(name, dims):
    need(name)
    # epsilon is a float32 attribute in ONNX: 1e-5 is stored as 9.99999975e-06
    check_train_forward(name, dims, tol=1e-9)
    check_eval_forward(name, dims, tol=1e-9)
    check_running_update(name, dims, 0.1, convention="biased_running_var", tol=1e-7)
    check_running_update(name, dims, None, convention="biased_running_var", tol=1e-7, steps=3)
    check_switches(name, dims, tol=1e-9)
    check_layout(name)


@pytest.mark.parametrize("name", ["onnx-reference", "onnxruntime"])
def test_onnx_has_no_gradients(name):
    need(name)
    d = Driver(name, 2)
    caps = d.adapter.capabilities
    assert not caps.backward and not caps.double_backward
    if name == "onnxruntime":
        assert "bfloat16" not in caps.dtypes
    with pytest.raises(NotImplementedError):
        d.forward(_values(SHAPES[2], torch.float32), dy=_values(SHAPES[2], torch.float32))


# ----------------------------------------------------------------------------- tinygrad, MLX

def test_tinygrad_translates_training_and_momentum():
    need("tinygrad")  # on the PYTHON device (no C compiler) a call takes seconds: keep this small
    d = Driver("tinygrad", 1, dtype="float64", momentum=None)
    p = _params(3)
    d.set(**p)
    x = _values((4, 3), seed=2)
    out = d.forward(x)  # training, although tinygrad defaults to inference
    _close(out["y"], R.train_forward(x, p["weight"], p["bias"], eps=1e-5, mode="oracle").y, 1e-12)
    mean, var = R.batch_stats(x, mode="oracle")
    want = R.update_running_stats(p["running_mean"], p["running_var"], torch.tensor(0), mean, var, 4,
                                  momentum=None)
    _close(out["state"]["running_var"], want.var, 1e-12)


def _compiler_for_tinygrad() -> str:
    """Why the tinygrad adapter must have chosen the CPU device, or skip (no compiler here)."""
    if "DEV" in os.environ:
        pytest.skip(f"DEV={os.environ['DEV']} set: the device is the user's choice")
    if importlib.util.find_spec("ziglang") is not None:
        return "ziglang installed"
    if shutil.which("clang") is not None:
        return "clang on PATH"
    pytest.skip("no C compiler for tinygrad's CPU device: pip install 'bnspec[tinygrad]' installs ziglang")


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_tinygrad_runs_on_the_cpu_device(dims):
    """With a C compiler (clang, or zig cc from the tinygrad extra) the adapter runs
    tinygrad's compiled CPU device, not the PYTHON interpreter, and says so; there it matches
    the reference at the shared checks' default float64 tolerances (tinygrad computes
    torch's formulas, in float64 throughout)."""
    module = need("tinygrad")
    why = _compiler_for_tinygrad()
    assert module.CONTEXT["DEV"] == "CPU", (why, module.DEVICE_NOTE)
    assert module.DEVICE_NOTE in module.TinygradAdapter.capabilities.notes
    with module.Context(**module.CONTEXT):
        assert module.Tensor([1.0]).realize().device == "CPU"
    check_torch_formulas("tinygrad", dims)
    check_switches("tinygrad", dims)
    if dims == 2:
        check_layout("tinygrad")


def test_zig_cc_translates_tinygrads_clang_arguments():
    """The argument translation alone (neither tinygrad nor zig needed)."""
    from bnspec.candidates import zig_cc_adapter as zig_cc

    head = ["-c", "-x", "c", "-O2", "-fPIC", "-ffreestanding", "-fno-math-errno", "-nostdlib", "-fno-ident"]
    tail = ["-march=native", "-", "-o", "-"]
    assert zig_cc.translate([*head, "--target=x86_64-none-unknown-elf", *tail]) == \
        [*head, "-target", "x86_64-freestanding-none", *tail, "-g0"]
    arm = ["-ffixed-x18", "-mcpu=native", "--target=arm64-none-unknown-elf", "-", "-o", "-"]
    assert zig_cc.translate(arm) == ["-ffixed-x18", "-mcpu=native", "-target", "aarch64-freestanding-none",
                                     "-", "-o", "-", "-g0"]
    assert zig_cc.translate(["-g", "-c", "a.c"]) == ["-g", "-c", "a.c", "-g0"]  # -g0 last: it wins
    for target in ("--target=x86_64-linux-gnu", "--target=x86_64", "--target="):
        with pytest.raises(ValueError):
            zig_cc.translate(["-c", target])


def test_zig_cc_for_tinygrad_reports_errors_on_stderr(capsys):
    from bnspec.candidates import zig_cc_adapter as zig_cc

    assert zig_cc.main(["-c", "--target=x86_64-linux-gnu", "-"]) == 2
    assert "not a bare-metal ELF target" in capsys.readouterr().err


def test_zig_wrapper_compiles_for_tinygrad_and_leaves_nothing_behind(tmp_path):
    """The adapter's wrapper script (zig cc through zig_cc_adapter.py) turns C on standard input into
    an ELF object on standard output, and passes a compile error on as zig's message and a
    non-zero exit status; zig's cache is written neither under HOME nor left in the
    temporary folder (tinygrad caches the objects itself)."""
    module = need("tinygrad")
    if importlib.util.find_spec("ziglang") is None or os.name != "posix":
        pytest.skip("not installed: pip install 'bnspec[tinygrad]' (ziglang)")
    wrapper = module.zig_wrapper()
    assert os.access(wrapper, os.X_OK) and module.zig_wrapper() == wrapper  # written once
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ZIG_", "XDG_"))}
    env.update(HOME=str(home), TMPDIR=str(tmp))
    args = [wrapper, "-c", "-x", "c", "-O2", "-ffreestanding", "-nostdlib", "--target=x86_64-none-unknown-elf",
            "-", "-o", "-"]
    # timeout: a compile takes well under a second; the limit only stops a hung compiler
    done = subprocess.run(args, input=b"double f(double x) { return x * 2.0; }\n", capture_output=True,
                          env=env, timeout=120, check=True)
    assert done.stdout.startswith(b"\x7fELF")
    bad = subprocess.run(args, input=b"double f(double x) { return x * ; }\n", capture_output=True, env=env,
                         timeout=120)
    assert bad.returncode != 0 and b"error" in bad.stderr and bad.stdout == b""
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["home", "tmp"]


@pytest.mark.parametrize("dims", [1, 2])
def test_mlx_translates_channel_axis(dims):
    need("mlx")
    check_torch_formulas("mlx", dims)
    check_layout("mlx")
    assert 3 not in load_adapter("mlx", dims=2).factories  # no BatchNorm3d in MLX


# ----------------------------------------------------------------------------- registry, home

def test_builtins_are_registered_with_their_extras():
    rows = {name: installed for name, _, installed in describe_builtins()}
    for name in ("torch-functional", "torch-compile", "torch-channels-last", "numpy"):
        assert rows[name] and BUILTINS[name].extra == ""
    for name, extra in OPTIONAL.items():
        assert BUILTINS[name].extra == extra


def test_optional_frameworks_leave_the_home_directory_alone(tmp_path):
    """Loading each installed framework adapter and running a forward writes nothing
    under HOME (onnxruntime and tinygrad would write caches under ~/.cache)."""
    names = [n for n in ("onnxruntime", "tinygrad", "flax-nnx", "mlx")
             if importlib.util.find_spec({"mlx": "mlx"}.get(n, OPTIONAL[n])) is not None]
    if not names:
        pytest.skip("not installed: pip install 'bnspec[all]'")
    home = tmp_path / "home"
    home.mkdir()
    script = textwrap.dedent(f"""
        import torch
        from bnspec.candidates.targets import load_adapter
        for name in {names!r}:
            a = load_adapter(name, dims=1)
            h = a.construct(1, 2, {{}})
            a.forward(h, torch.randn(3, 2))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_CACHE_HOME", "CACHEDB")}
    env["HOME"] = str(home)
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=600)
    assert sorted(p.name for p in home.rglob("*")) == []


def test_native_facts_are_read_from_the_frameworks_api():
    """The conventions table's defaults come from the constructor's signature (or an operator
    schema's defaults), the momentum direction from the translation the adapter applies, and
    only switches the framework really has are named."""
    from bnspec.candidates.protocol import as_given, native_facts

    def layer(num_features, epsilon=1e-3, momentum=0.99, use_fast_variance=True):
        return None

    facts = native_facts("layer", layer, eps="epsilon", momentum="momentum", translate=lambda f: 1.0 - f,
                         settings={"use_fast_variance": "one-pass", "no_such_switch": "dropped"})
    assert facts == {"layer": "layer", "eps": 1e-3, "momentum": 0.99, "momentum_weights": "old", "float64": "",
                     "settings": {"use_fast_variance": "one-pass"}}
    schema = native_facts("op", {"epsilon": 1e-5}, eps="epsilon", momentum="momentum", translate=as_given)
    assert (schema["eps"], schema["momentum"], schema["momentum_weights"]) == (1e-5, None, "new")


def test_native_facts_see_through_a_metaclass_call():
    """flax.nnx's modules are built by a metaclass whose ``__call__(*args, **kwargs)`` hides
    ``__init__``'s signature: the defaults are then read from ``__init__``."""
    from bnspec.candidates.protocol import as_given, native_facts

    class Meta(type):
        def __call__(cls, *args, **kwargs):
            return super().__call__(*args, **kwargs)

    class Layer(metaclass=Meta):
        def __init__(self, num_features, *, epsilon=1e-5, momentum=0.99):
            pass

    facts = native_facts("Layer", Layer, eps="epsilon", momentum="momentum", translate=as_given)
    assert (facts["eps"], facts["momentum"]) == (1e-5, 0.99)
