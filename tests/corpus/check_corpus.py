"""Demonstrate every claim of tests/corpus/__init__.py (CORPUS) against torch.nn.BatchNorm2d.

Not a pytest file. Run: ``.venv/bin/python tests/corpus/check_corpus.py``; it prints one
line per layer and exits 1 if any claim does not hold.

For each layer it checks, on seeded inputs:

* the contract gaps: constructor keywords present/absent, value variants working or
  not, parameters/buffers/reset methods present or not, constructor defaults;
* torch's behaviour outside the claims: errors (types as torch's), the input left
  untouched, channels_last kept, float16/bfloat16 reduced in float32, N = 0, no
  autograd history in the running statistics;
* the conventions: the layer equals a float64 model of its convention (training output,
  running statistics over 3 steps, eval output, gradients of x/weight/bias) in float32
  and float64, and torch differs from it visibly;
* for the correct layers: equality with torch in every mode and variant.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import inspect
import pathlib
import sys

import torch

HERE = pathlib.Path(__file__).resolve().parent
TBN = torch.nn.BatchNorm2d
KEYWORDS = ("eps", "momentum", "affine", "track_running_stats", "device", "dtype", "bias")
VARIANTS = {"momentum=None": {"momentum": None}, "affine=False": {"affine": False},
            "track_running_stats=False": {"track_running_stats": False}, "bias=False": {"bias": False}}


def load(path: pathlib.Path, attr: str | None = None):
    spec = importlib.util.spec_from_file_location(f"corpus_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return getattr(mod, attr) if attr else mod


class Claims:
    def __init__(self):
        self.n, self.failed = 0, []

    def __call__(self, ok, what):
        self.n += 1
        if not ok:
            self.failed.append(what)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(shape, seed, dtype=torch.float32, scale=2.0, shift=0.5):
    return (torch.randn(shape, generator=gen(seed), dtype=torch.float64) * scale + shift).to(dtype)


def pc(v):
    return v.reshape(1, -1, 1, 1)


def stats(x):
    x = x.double()
    n = x.numel() // x.shape[1]
    mean = x.mean((0, 2, 3))
    vb = ((x - pc(mean)) ** 2).mean((0, 2, 3))
    return mean, vb, vb * n / (n - 1)


def close(a, b, tol):
    a, b = a.detach().double(), b.detach().double()
    return a.shape == b.shape and bool(((a - b).abs() <= tol * (1 + b.abs())).all())


def tol_for(dtype):
    return 1e-10 if dtype == torch.float64 else 2e-5


def make(cls, c=3, dtype=torch.float32, **kw):
    if "dtype" in inspect.signature(cls).parameters:
        return cls(c, dtype=dtype, **kw)
    return cls(c, **kw).to(dtype)


def randomize(m, seed):
    """Random weight, bias and running statistics (so every term of the formulas shows)."""
    with torch.no_grad():
        for i, name in enumerate(("weight", "bias", "running_mean", "running_var")):
            t = getattr(m, name, None)
            if isinstance(t, torch.Tensor):
                v = randn(t.shape, seed + i, t.dtype, 0.5, 1.0)
                t.copy_(v.abs() + 0.1 if name == "running_var" else v)


def raised(fn, *a, **kw):
    try:
        fn(*a, **kw)
    except Exception as e:  # noqa: BLE001 - the type is what we compare
        return type(e)
    return None


# ----------------------------------------------------------------------------- contract gaps

def check_gaps(cls, info, ok):
    gaps = info["contract_gaps"]
    sig = inspect.signature(cls).parameters
    for kw in KEYWORDS:
        ok((kw not in sig) == (kw in gaps), f"keyword {kw!r} present={kw in sig} but gap={kw in gaps}")
    if "bias" in gaps:
        ok(raised(cls, 3, **{"bias": False}) is TypeError, "bias=False must be a TypeError")
    x = randn((4, 3, 3, 3), 1)
    for name, kw in VARIANTS.items():
        works = True
        try:
            m = cls(3, **kw)
            m.train()
            for s in range(3):
                m(randn((4, 3, 3, 3), 10 + s))
            t = TBN(3, **kw).train()
            for s in range(3):
                t(randn((4, 3, 3, 3), 10 + s))
            if name == "momentum=None":
                works = close(m.running_mean, t.running_mean, 1e-5) and close(m.running_var, t.running_var, 1e-5)
            elif name == "affine=False":
                works = m.weight is None and m.bias is None and close(m(x), t(x), 1e-5)
            elif name == "bias=False":
                works = isinstance(m.weight, torch.nn.Parameter) and m.bias is None and close(m(x), t(x), 1e-5)
            else:
                m.eval(), t.eval()
                works = m.running_mean is None and m.running_var is None and close(m(x), t(x), 1e-5)
        except Exception:  # noqa: BLE001
            works = False
        ok(works == (name not in gaps), f"variant {name}: works={works} but gap={name in gaps}")
    m = cls(3)
    params, buffers = dict(m.named_parameters()), dict(m.named_buffers())
    has = {"weight parameter": "weight" in params, "bias parameter": "bias" in params,
           "running_mean buffer": "running_mean" in buffers, "running_var buffer": "running_var" in buffers,
           "num_batches_tracked buffer": buffers.get("num_batches_tracked", torch.empty(0)).dtype == torch.int64
           and buffers["num_batches_tracked"].dim() == 0,
           "reset_running_stats": callable(getattr(m, "reset_running_stats", None)),
           "reset_parameters": callable(getattr(m, "reset_parameters", None)),
           "state_dict": callable(getattr(m, "state_dict", None)),
           "load_state_dict": callable(getattr(m, "load_state_dict", None)),
           "train/eval": callable(getattr(m, "train", None)) and callable(getattr(m, "eval", None))}
    for piece, present in has.items():
        ok(present != (piece in gaps), f"{piece}: present={present} but gap={piece in gaps}")
    if has["reset_running_stats"]:
        m.train()(randn((4, 3, 3, 3), 3))
        m.reset_running_stats()
        ok(bool((m.running_mean == 0).all() and (m.running_var == 1).all()), "reset_running_stats values")
        if has["num_batches_tracked buffer"]:
            ok(int(m.num_batches_tracked) == 0, "reset_running_stats counter")
    if has["reset_parameters"]:
        randomize(m, 5)
        m.reset_parameters()
        ok(bool((m.weight == 1).all() and (m.bias == 0).all() and (m.running_var == 1).all()), "reset_parameters")
    torch_defaults = {"eps": 1e-5, "momentum": 0.1}
    diffs = {k: sig[k].default for k in torch_defaults if k in sig and sig[k].default != torch_defaults[k]}
    ok(diffs == info["default_differences"], f"default differences {diffs} vs {info['default_differences']}")


# ----------------------------------------------------------------------------- torch's behaviour beyond the claims

def inference(info):
    """The context in which the layer uses its running statistics in eval mode."""
    return torch.no_grad() if "stats_by_grad_mode" in info["conventions"] else contextlib.nullcontext()


def check_common(cls, info, ok):
    frozen = "running_stats_in_training" in info["conventions"]
    m, t = cls(3).train(), TBN(3).train()
    for what, x in {"wrong rank": torch.randn(2, 3, 4), "wrong channels": torch.randn(2, 4, 3, 3),
                    "integer input": torch.ones(2, 3, 3, 3, dtype=torch.long)}.items():
        ok(raised(m, x) is raised(t, x) is not None, f"{what}: {raised(m, x)} vs torch {raised(t, x)}")
    for mode in (True, False):  # a 1-channel module must not broadcast over 3 channels
        small, tsmall, x = cls(1).train(mode), TBN(1).train(mode), randn((2, 3, 4, 4), 1)
        with inference(info) if not mode else contextlib.nullcontext():
            ok(raised(small, x) is raised(tsmall, x) is RuntimeError, f"1 vs 3 channels (training={mode})")
    one = torch.randn(1, 3, 1, 1)
    ok(raised(m, one) is (None if frozen else ValueError), f"one value per channel in training: {raised(m, one)}")
    m.eps = 0.0
    ok(raised(m, randn((4, 3, 3, 3), 2)) is (None if frozen else ValueError), "eps=0 in training")
    m.eval()
    with inference(info):
        ok(raised(m, randn((4, 3, 3, 3), 2)) is None, "eps=0 in eval is legal")
        m.eps = -1.0
        ok(raised(m, randn((4, 3, 3, 3), 2)) is ValueError, "eps<0 in eval")
    m.eps = 1e-5
    for mode in (True, False):
        m = cls(3).train(mode)
        x = randn((4, 3, 5, 6), 3).contiguous(memory_format=torch.channels_last)
        keep = x.clone()
        y = m(x)
        ok(torch.equal(x, keep), "input modified")
        ok(y.is_contiguous(memory_format=torch.channels_last), f"channels_last not kept (training={mode})")
        for half in (torch.float16, torch.bfloat16):
            xh = randn((4, 3, 5, 6), 4).to(half)
            a, b = copy.deepcopy(m), copy.deepcopy(m)
            yh, yf = a(xh), b(xh.float()).to(half)
            ok(yh.dtype == half and close(yh, yf, 1e-2), f"{half} not reduced in float32 (training={mode})")
    m = cls(3).train()
    before = {k: v.clone() for k, v in m.named_buffers()}
    y = m(torch.randn(0, 3, 4, 4))
    ok(y.shape == (0, 3, 4, 4), "N=0 output shape")
    for k, v in m.named_buffers():
        if k == "num_batches_tracked":
            ok(int(v) == int(before[k]) + 1, "N=0 counts the step")
        else:
            ok(torch.equal(v, before[k]), f"N=0 changed {k}")
    m(randn((4, 3, 3, 3), 6, torch.float32).requires_grad_())
    ok(all(not v.requires_grad and v.grad_fn is None for v in m.buffers()), "running stats carry autograd history")


# ----------------------------------------------------------------------------- conventions against a float64 model

def model_output(x, m, stats_used, w=None, b=None):
    """(x - mean) / sqrt(var + eps) * weight + bias in float64 (weight/bias: m's unless given)."""
    mean, var = stats_used
    w = m.weight.detach().double() if w is None else w
    b = m.bias.detach().double() if b is None else b
    return (x - pc(mean)) / torch.sqrt(pc(var) + m.eps) * pc(w) + pc(b)


def check_model(cls, info, ok, *, norm, run_var, on_old, update=True, shape=(2, 3, 2, 3)):
    """Layer == float64 model of its conventions over 3 training steps and one eval step."""
    torch_sees = {}
    for dtype in (torch.float32, torch.float64):
        tol = tol_for(dtype)
        m = make(cls, 3, dtype)
        randomize(m, 20)
        t = TBN(3, dtype=dtype)
        with torch.no_grad():
            for k in ("weight", "bias", "running_mean", "running_var"):
                getattr(t, k).copy_(getattr(m, k))
        params = [p for p in (m.weight, m.bias) if isinstance(p, torch.nn.Parameter)]
        for step in range(3):
            x = randn(shape, 30 + step, dtype).requires_grad_()
            g = randn(shape, 40 + step, dtype)
            x64 = x.detach().double().requires_grad_()
            w64 = m.weight.detach().double().requires_grad_()
            b64 = m.bias.detach().double().requires_grad_()
            mean, vb, vu = stats(x64.detach())
            old = m.running_mean.detach().double().clone(), m.running_var.detach().double().clone()
            if norm == "running":
                used = old
            else:
                n = x.numel() // 3
                bm = x64.mean((0, 2, 3))
                bvb = ((x64 - pc(bm)) ** 2).mean((0, 2, 3))
                used = bm, (bvb * n / (n - 1) if norm == "unbiased" else bvb)
            expected = model_output(x64, m, used, w64, b64)
            y = m.train()(x)
            ok(y.dtype == dtype and close(y, expected, tol), f"{dtype} step {step}: training output != model")
            grads = torch.autograd.grad(y, [x, *params], g)
            egrads = torch.autograd.grad(expected, [x64, w64, b64][:1 + len(params)], g.double())
            ok(all(close(a, b, 10 * tol) for a, b in zip(grads, egrads)), f"{dtype} step {step}: gradients")
            if update:
                f = m.momentum
                nv = vb if run_var == "biased" else vu
                em = f * old[0] + (1 - f) * mean if on_old else (1 - f) * old[0] + f * mean
                ev = f * old[1] + (1 - f) * nv if on_old else (1 - f) * old[1] + f * nv
            else:
                em, ev = old
            ok(close(m.running_mean, em, tol) and close(m.running_var, ev, tol), f"{dtype} step {step}: running stats")
            yt = t.train()(x)
            torch_sees[dtype] = max(torch_sees.get(dtype, 0.0), (yt - y).abs().max().item(),
                                    (t.running_mean - m.running_mean).abs().max().item(),
                                    (t.running_var - m.running_var).abs().max().item())
        x = randn(shape, 50, dtype)
        expected = model_output(x.double(), m, (m.running_mean.double(), m.running_var.double()))
        with inference(info):
            ok(close(m.eval()(x), expected, tol), f"{dtype}: eval output != running-statistics formula")
    return torch_sees


# ----------------------------------------------------------------------------- equality with torch

def check_equals_torch(cls, info, ok, variants, counter=True, layouts=("contiguous", "channels_last")):
    for kw in variants:
        for dtype in (torch.float32, torch.float64):
            t = TBN(3, dtype=dtype, **kw)
            m = cls(3, dtype=dtype, **kw)
            randomize(t, 60)
            sd = t.state_dict()
            if counter:
                ok(list(m.state_dict()) == list(sd), f"{kw}: state_dict keys {list(m.state_dict())}")
                m.load_state_dict(sd, strict=True)
                TBN(3, dtype=dtype, **kw).load_state_dict(m.state_dict(), strict=True)
            else:
                ok(list(m.state_dict()) == [k for k in sd if k != "num_batches_tracked"], f"{kw}: state_dict keys")
                m.load_state_dict({k: v for k, v in sd.items() if k != "num_batches_tracked"}, strict=True)
            tp = [p for p in t.parameters()]
            mp = [p for p in m.parameters()]
            for step, layout in enumerate(layouts * 2):
                for mode in (True, True, False):
                    x = randn((3, 3, 4, 5), 70 + step, dtype)
                    if layout == "channels_last":
                        x = x.contiguous(memory_format=torch.channels_last)
                    x.requires_grad_()
                    g = randn((3, 3, 4, 5), 80 + step, dtype)
                    yt, ym = t.train(mode)(x), m.train(mode)(x)
                    gt = torch.autograd.grad(yt, [x, *tp], g)
                    gm = torch.autograd.grad(ym, [x, *mp], g)
                    same = torch.equal(yt, ym) and yt.stride() == ym.stride() and all(
                        torch.equal(a, b) for a, b in zip(gt, gm))
                    bt = {k: v for k, v in t.named_buffers()}
                    bm = {k: v for k, v in m.named_buffers()}
                    if not counter:
                        bt.pop("num_batches_tracked", None)
                    same = same and bt.keys() == bm.keys() and all(torch.equal(bt[k], bm[k]) for k in bt)
                    ok(same, f"{kw} {dtype} {layout} training={mode}: differs from torch")
            for xh in (randn((3, 3, 4, 5), 90, torch.float16), randn((3, 3, 4, 5), 90, torch.bfloat16)):
                if dtype == torch.float32:
                    ok(torch.equal(t.train()(xh), m.train()(xh)), f"{kw} {xh.dtype} input differs from torch")


def main() -> int:
    corpus = load(HERE / "__init__.py").CORPUS
    rc = 0
    for target, info in corpus.items():
        file, name = target.split(":")
        cls = load(HERE / file, name)
        ok = Claims()
        notes = ""
        try:
            check_gaps(cls, info, ok)
            check_common(cls, info, ok)
            notes = CHECKS[target](cls, info, ok)
        except Exception as e:  # noqa: BLE001
            ok(False, f"crashed: {type(e).__name__}: {e}")
        conv = ",".join(sorted(info["conventions"])) or "-"
        status = "OK  " if not ok.failed else "FAIL"
        print(f"{status} {target:40s} {ok.n:3d} claims  conventions={conv}  {notes or ''}")
        for f in ok.failed:
            print(f"       failed: {f}")
        rc |= bool(ok.failed)
    return rc


# ----------------------------------------------------------------------------- per-layer demonstrations

def _diff(seen):
    return "torch differs by " + ", ".join(f"{str(k)[6:]}:{v:.2g}" for k, v in seen.items())


def lecture(cls, info, ok):
    seen = check_model(cls, info, ok, norm="unbiased", run_var="unbiased", on_old=False)
    ok(min(seen.values()) > 1e-3, "torch should differ visibly (unbiased normalization)")
    return _diff(seen)


def interview(cls, info, ok):
    seen = check_model(cls, info, ok, norm="biased", run_var="biased", on_old=False)
    ok(min(seen.values()) > 1e-3, "torch should differ visibly (biased running var)")
    return _diff(seen)


def keras(cls, info, ok):
    seen = check_model(cls, info, ok, norm="biased", run_var="biased", on_old=True)
    ok(min(seen.values()) > 1e-3, "torch should differ visibly")
    return _diff(seen)


def textbook(cls, info, ok):
    seen = check_model(cls, info, ok, norm="biased", run_var="biased", on_old=True)
    x = randn((4, 3, 3, 3), 100)
    m, t = cls(3), TBN(3)
    randomize(m, 7)
    t.load_state_dict({**m.state_dict(), "num_batches_tracked": torch.tensor(0)})
    rm = m.running_mean.clone()
    with torch.no_grad():
        y, yt = m.train()(x), t.train()(x)
    ok(close(y, model_output(x.double(), m, (rm.double(), m.running_var.double())), 1e-5),
       "no_grad in training: should use the moving statistics")
    ok(torch.equal(rm, m.running_mean), "no_grad in training: should update nothing")
    ok((y - yt).abs().max() > 1e-2, "no_grad in training: torch uses batch statistics")
    y = m.eval()(x)
    mean, vb, vu = stats(x)
    ok(close(y, model_output(x.double(), m, (mean, vb)), 1e-5), "eval with grad: should use batch statistics")
    ok(not torch.equal(rm, m.running_mean), "eval with grad: should update the moving statistics")
    m, t = cls(3), TBN(3)
    m(x), t(x)
    ok(close(m.running_mean, t.running_mean, 1e-6), "default momentum 0.9 on old == torch's 0.1 on new (mean)")
    ok(close(m.running_var, 0.9 + 0.1 * vb, 1e-6) and not close(m.running_var, t.running_var, 1e-3),
       "running var is the biased blend")
    return _diff(seen)


def blog(cls, info, ok):
    seen = check_model(cls, info, ok, norm="biased", run_var="unbiased", on_old=False)
    ok(max(seen.values()) < 1e-4, "on centred data the one-pass variance is torch's")
    # catastrophic cancellation: |mean| >> std, float32
    x = randn((4, 3, 4, 4), 110, torch.float32, scale=1.0, shift=1000.0)
    m, t = cls(3).train(), TBN(3).train()
    y, yt = m(x), t(x)
    mean = x.mean((0, 2, 3))
    v1 = (x * x).mean((0, 2, 3)) - mean * mean
    y1 = (x - pc(mean)) / torch.sqrt(pc(v1) + 1e-5)
    ok(close(y, y1, 1e-6), "output should be the float32 one-pass formula")
    err = (y - yt).abs().max().item()
    ok(err > 0.1, f"one-pass variance should be visibly off for |mean| >> std (got {err:.2g})")
    return f"torch differs by {err:.2g} for mean 1000, std 1 (float32)"


def frozen(cls, info, ok):
    seen = check_model(cls, info, ok, norm="running", run_var=None, on_old=False, update=False)
    ok(min(seen.values()) > 1e-2, "torch training should differ (batch statistics)")
    m = cls(3)
    randomize(m, 9)
    ok(sorted(dict(m.named_buffers())) == ["bias", "running_mean", "running_var", "weight"] and
       not list(m.parameters()), "weight/bias/stats should all be buffers")
    t = TBN(3)
    t.load_state_dict({**m.state_dict(), "num_batches_tracked": torch.tensor(0)})
    x = randn((4, 3, 3, 3), 120)
    ok(close(m.train()(x), t.eval()(x), 1e-6), "training output should be torch's eval output")
    return _diff(seen)


def older(cls, info, ok):
    check_equals_torch(cls, info, ok, [{}, {"momentum": None}, {"momentum": 0.3}, {"affine": False},
                                       {"track_running_stats": False}])
    return "equals torch exactly (values, grads, stats, counter, strides, half)"


def nocounter(cls, info, ok):
    check_equals_torch(cls, info, ok, [{}, {"momentum": 0.3}, {"affine": False}, {"bias": False},
                                       {"track_running_stats": False}], counter=False)
    err = None
    try:
        cls(3, momentum=None)
    except ValueError as e:
        err = str(e)
    ok(err == "momentum=None (cumulative average) is not supported", f"momentum=None message {err!r}")
    return "equals torch exactly apart from the counter"


def layout(cls, info, ok):
    check_equals_torch(cls, info, ok, [{}, {"momentum": None}, {"affine": False}, {"bias": False},
                                       {"track_running_stats": False}], layouts=("contiguous",))
    worst = {}
    for what, x in {"channels_last": randn((3, 3, 4, 5), 130).contiguous(memory_format=torch.channels_last),
                    "slice": randn((3, 3, 8, 5), 131)[:, :, ::2],
                    "transposed": randn((3, 3, 5, 4), 132).transpose(2, 3)}.items():
        for mode in (True, False):
            m, t = cls(3), TBN(3)
            randomize(t, 11)
            m.load_state_dict(t.state_dict())
            xg = x.detach().requires_grad_()
            ym, yt = m.train(mode)(xg), t.train(mode)(x)
            worst[what] = max(worst.get(what, 0.0), (ym - yt).abs().max().item())
            ok(ym.stride() == yt.stride(), f"{what}: output strides {ym.stride()} vs torch {yt.stride()}")
            (gx,) = torch.autograd.grad(ym.sum() + (ym * ym).sum(), [xg])
            ok(bool(torch.isfinite(gx).all()) and gx.abs().max() > 0, f"{what}: gradient should flow")
        ok(worst[what] > 0.1, f"{what}: values should be wrong")
    return "wrong values for " + ", ".join(f"{k} ({v:.2g})" for k, v in worst.items())


CHECKS = {"lecture.py:LectureBatchNorm2d": lecture, "textbook.py:TextbookBatchNorm2d": textbook,
          "blog.py:BlogBatchNorm2d": blog, "interview.py:InterviewBatchNorm2d": interview,
          "frozen.py:FrozenBatchNorm2d": frozen, "older.py:OlderBatchNorm2d": older,
          "nocounter.py:NoCounterBatchNorm2d": nocounter, "layout.py:ContiguousMemoryBatchNorm2d": layout,
          "keras_style.py:KerasStyleBatchNorm2d": keras}

if __name__ == "__main__":
    sys.exit(main())
