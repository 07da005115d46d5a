"""The CUDA kernels (csrc/*/*_cuda.cu) executed on this CPU through the host harness (tools/cuda_host/):
every block's threads are real threads, under AddressSanitizer + UBSan for the parity tests and under
ThreadSanitizer for one shape per kernel. Results are compared with the plain-PyTorch references in
float64; outputs the kernels must not touch (dead heads, padding) are pre-filled with a sentinel and
checked untouched. Builds are cached under build/cuda_host/ (about 40 s of CPU the first time)."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cofi.ops.reference.hard_concrete import EPS, LIMIT_L, LIMIT_R, TEMPERATURE, hard_concrete_keep_prob_ref, \
    hard_concrete_sample_ref
from cofi.ops.reference.masked_attention import dropout_seed, dropout_threshold, masked_attention_core_ref
from cofi.ops.reference.masked_ffn import activation_ref
from cofi.ops.reference.masked_layer_norm import masked_layer_norm_ref, row_stats

_spec = importlib.util.spec_from_file_location(
    "cuda_host_harness", Path(__file__).resolve().parents[2] / "tools" / "cuda_host" / "harness.py")
harness = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = harness  # before exec: its dataclasses look their module up
_spec.loader.exec_module(harness)
Alias, Buf, Call = harness.Alias, harness.Buf, harness.Call

_DRIVERS: dict[tuple[str, str], harness.Driver] = {}
CUDA_INVALID_VALUE = 1
# Relative / absolute tolerance per dtype vs the float64 reference on the same (rounded) inputs.
TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (2e-5, 2e-6), torch.float16: (2e-3, 2e-3),
       torch.bfloat16: (1.6e-2, 1e-2)}


def driver(op: str, sanitizer: str = "address") -> harness.Driver:
    why = harness.unavailable(sanitizer)
    if why:
        pytest.skip(f"host harness ({sanitizer}): {why}")
    if (op, sanitizer) not in _DRIVERS:
        _DRIVERS[op, sanitizer] = harness.Driver(harness.build(op, sanitizer), sanitizer)
    return _DRIVERS[op, sanitizer]


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str, scale: float = 1.0) -> None:
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol * scale, atol=atol * scale,
                               equal_nan=True, msg=lambda m: f"{what}: {m}")


def sentinel(shape, dtype) -> torch.Tensor:
    return torch.full((shape,) if isinstance(shape, int) else shape, float("nan"), dtype=dtype)


def untouched(t: torch.Tensor) -> bool:
    return bool(torch.isnan(t.double()).all())


# ============================== hard concrete ====================================================
def _hc_inputs(n: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    la = torch.randn(n, generator=gen, dtype=torch.float64) * 3
    u = torch.rand(n, generator=gen, dtype=torch.float64).clamp(1e-6, 1 - 1e-6)
    g = torch.randn(n, generator=gen, dtype=torch.float64)
    if n >= 8:  # NaN / out-of-range noise gives NaN gates; non-finite upstream gradients
        u[:4] = torch.tensor([float("nan"), 1.5, 0.0, 1.0], dtype=torch.float64)
        g[4:8] = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0], dtype=torch.float64)
        la[4:8] = torch.tensor([30.0, -30.0, 0.5, 0.0], dtype=torch.float64)
    return la.to(dtype), u.to(dtype), g.to(dtype)


def _hc_expected(la, u, g, q0):
    la, u, g = la.double(), u.double(), g.double()
    t, l, r = TEMPERATURE, LIMIT_L, LIMIT_R
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + la) / t)
    sbar = s * (r - l) + l
    inside = (sbar > 0) & (sbar < 1)
    q = torch.sigmoid(q0 - la)
    return {
        "sample_fwd": hard_concrete_sample_ref(la, u),
        "sample_bwd": torch.where(inside, g * ((r - l) * s * (1 - s) / t), torch.zeros_like(g)),
        "keep_fwd": hard_concrete_keep_prob_ref(la),
        "keep_bwd": torch.where((q > EPS) & (q < 1 - EPS), g * (q * (1 - q)), torch.zeros_like(g)),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hard_concrete(dtype):
    """All four elementwise kernels: 1,000 elements (four blocks, tail), one, and none."""
    xn = -LIMIT_L / (LIMIT_R - LIMIT_L)
    q0 = (math.log(xn) - math.log1p(-xn)) * TEMPERATURE  # as the glue computes it
    sfx = "f32" if dtype == torch.float32 else "f64"
    t, l, r = TEMPERATURE, LIMIT_L, LIMIT_R
    calls, expect = [], []
    for n in (1000, 1, 0):
        la, u, g = _hc_inputs(n, dtype, seed=n)
        exp = _hc_expected(la, u, g, q0)
        calls += [Call(f"cofi_hc_sample_fwd_{sfx}", [Buf(la), Buf(u), Buf(sentinel(n, dtype), out=True), n, t, l, r, None]),
                  Call(f"cofi_hc_sample_bwd_{sfx}", [Buf(g), Buf(la), Buf(u), Buf(sentinel(n, dtype), out=True), n, t, l, r,
                                                      None]),
                  Call(f"cofi_hc_keep_fwd_{sfx}", [Buf(la), Buf(sentinel(n, dtype), out=True), n, q0, EPS, None]),
                  Call(f"cofi_hc_keep_bwd_{sfx}", [Buf(g), Buf(la), Buf(sentinel(n, dtype), out=True), n, q0, EPS, None])]
        expect += [(exp["sample_fwd"], 2), (exp["sample_bwd"], 3), (exp["keep_fwd"], 1), (exp["keep_bwd"], 2)]
    for call, res, (ref, idx) in zip(calls, driver("hard_concrete").run(calls), expect):
        assert res.rc == 0, call.name
        close(res.outputs[idx], ref, dtype, f"{call.name} n={ref.numel()}")


# ============================== masked_ffn epilogues =============================================
_FFN_DTYPES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
_ACTS = {"gelu": 0, "gelu_tanh": 1, "relu": 2}


@pytest.mark.parametrize("dtype", list(_FFN_DTYPES))
def test_masked_ffn_epilogues(dtype):
    """Forward and backward epilogues for each activation on [5, 103] (three blocks, tail); backward both
    with separate outputs and with dh aliasing g (as the glue calls it); N * L = 0 touches nothing."""
    N, L = 5, 103
    gen = torch.Generator().manual_seed(1)
    calls, checks = [], []
    code = _FFN_DTYPES[dtype]
    for act, a_code in _ACTS.items():
        h = (torch.randn(N, L, generator=gen, dtype=torch.float64) * 2).to(dtype)
        b1 = torch.randn(L, generator=gen, dtype=torch.float64).to(dtype)
        s = torch.rand(L, generator=gen, dtype=torch.float64).to(dtype)
        g = torch.randn(N, L, generator=gen, dtype=torch.float64).to(dtype)
        v = h.double() + b1.double()
        calls.append(Call("cofi_masked_ffn_fwd_epilogue", [code, Buf(h, out=True), Buf(sentinel((N, L), dtype), out=True),
                                                           Buf(b1), Buf(s), N, L, a_code, None]))
        checks.append((f"fwd {act}", {1: v, 2: activation_ref(v, act) * s.double()}))
        hv = h.double().requires_grad_()
        f = activation_ref(hv, act)
        (dact,) = torch.autograd.grad(f.sum(), hv)
        f = f.detach()
        calls.append(Call("cofi_masked_ffn_bwd_epilogue", [code, Buf(h), Buf(g), Buf(sentinel((N, L), dtype), out=True),
                                                           Buf(sentinel((N, L), dtype), out=True),
                                                           Buf(sentinel((N, L), dtype), out=True), Buf(s), N, L, a_code,
                                                           None]))
        checks.append((f"bwd {act}", {3: g.double() * s.double() * dact, 4: f * s.double(), 5: f * g.double()}))
        calls.append(Call("cofi_masked_ffn_bwd_epilogue", [code, Buf(h), Buf(g.clone(), out=True), Alias(2), None, None,
                                                           Buf(s), N, L, a_code, None]))
        checks.append((f"bwd {act}, dh aliasing g", {2: g.double() * s.double() * dact}))
    empty = torch.zeros(0, 7, dtype=dtype)
    calls.append(Call("cofi_masked_ffn_fwd_epilogue", [code, Buf(empty, out=True), Buf(empty, out=True),
                                                       Buf(sentinel(7, dtype), out=True), Buf(sentinel(7, dtype)), 0, 7, 0,
                                                       None]))
    checks.append(("fwd N=0", {3: sentinel(7, torch.float64)}))
    for res, (label, chk) in zip(driver("masked_ffn").run(calls), checks):
        assert res.rc == 0, label
        for idx, ref in chk.items():
            close(res.outputs[idx], ref, dtype, f"{label}: argument {idx}", scale=4.0)


_GATES = {"gelu": 0, "gelu_tanh": 1, "relu": 2, "silu": 3}


@pytest.mark.parametrize("dtype", list(_FFN_DTYPES))
def test_masked_ffn_gated_epilogues(dtype):
    """Gated epilogues (H = [gate | up], [5, 2 x 103]) for each gate function, am / fg present and
    absent; N * L = 0 touches nothing."""
    N, L = 5, 103
    gen = torch.Generator().manual_seed(2)
    calls, checks = [], []
    code = _FFN_DTYPES[dtype]
    for act, a_code in _GATES.items():
        H = (torch.randn(N, 2 * L, generator=gen, dtype=torch.float64) * 2).to(dtype)
        bgu = torch.randn(2 * L, generator=gen, dtype=torch.float64).to(dtype)
        s = torch.rand(L, generator=gen, dtype=torch.float64).to(dtype)
        G = torch.randn(N, L, generator=gen, dtype=torch.float64).to(dtype)
        v = H.double() + bgu.double()
        gv, uv = v[:, :L], v[:, L:]
        calls.append(Call("cofi_masked_ffn_gated_fwd_epilogue", [code, Buf(H, out=True),
                                                                 Buf(sentinel((N, L), dtype), out=True), Buf(bgu), Buf(s),
                                                                 N, L, a_code, None]))
        checks.append((f"gated fwd {act}", {1: v, 2: activation_ref(gv, act) * uv * s.double()}))
        hg = H.double()[:, :L].requires_grad_()
        u = H.double()[:, L:]
        f = activation_ref(hg, act)
        (dact,) = torch.autograd.grad(f.sum(), hg)
        f = f.detach()
        Gs = G.double() * s.double()
        calls.append(Call("cofi_masked_ffn_gated_bwd_epilogue", [code, Buf(H), Buf(G),
                                                                 Buf(sentinel((N, 2 * L), dtype), out=True),
                                                                 Buf(sentinel((N, L), dtype), out=True),
                                                                 Buf(sentinel((N, L), dtype), out=True), Buf(s), N, L,
                                                                 a_code, None]))
        checks.append((f"gated bwd {act}", {3: torch.cat([Gs * u * dact, Gs * f], 1), 4: f * u * s.double(),
                                            5: f * u * G.double()}))
        calls.append(Call("cofi_masked_ffn_gated_bwd_epilogue", [code, Buf(H), Buf(G),
                                                                 Buf(sentinel((N, 2 * L), dtype), out=True), None, None,
                                                                 Buf(s), N, L, a_code, None]))
        checks.append((f"gated bwd {act}, no am / fg", {3: torch.cat([Gs * u * dact, Gs * f], 1)}))
    empty = torch.zeros(0, 14, dtype=dtype)
    calls.append(Call("cofi_masked_ffn_gated_fwd_epilogue", [code, Buf(empty, out=True), Buf(empty, out=True),
                                                             Buf(sentinel(14, dtype), out=True), Buf(sentinel(7, dtype)),
                                                             0, 7, 3, None]))
    checks.append(("gated fwd N=0", {3: sentinel(14, torch.float64)}))
    for res, (label, chk) in zip(driver("masked_ffn").run(calls), checks):
        assert res.rc == 0, label
        for idx, ref in chk.items():
            close(res.outputs[idx], ref, dtype, f"{label}: argument {idx}", scale=4.0)


# ============================== masked_layer_norm ================================================
_LN_DTYPES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


def _ln_case(dtype, N, d, residual, gated, gen):
    x = torch.randn(N, d, generator=gen, dtype=torch.float64)
    x[0] = 0.75  # constant row: normalises to exactly 0 (corrected two-pass statistics)
    r = torch.randn(N, d, generator=gen, dtype=torch.float64) if residual else None
    w = torch.randn(d, generator=gen, dtype=torch.float64)
    b = torch.randn(d, generator=gen, dtype=torch.float64)
    z = None
    if gated:
        z = torch.rand(d, generator=gen, dtype=torch.float64) + 0.5
        z[::3] = 0.0
    if r is not None:
        r[0] = 0.0
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(x), cast(r), cast(w), cast(b), cast(z)


@pytest.mark.parametrize("dtype", list(_LN_DTYPES))
def test_masked_layer_norm(dtype):
    """Forward (y, mean, rstd) and backward (dx, dr and the per-row dw, db, dz contributions) with and
    without residual and hidden_z, for d = 300 (two elements per thread, tail) and d = 7; N = 0."""
    gen = torch.Generator().manual_seed(2)
    code, eps = _LN_DTYPES[dtype], 1e-5
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    calls, checks = [], []
    ptr = lambda t, out=False: None if t is None else Buf(t, out=out)  # noqa: E731
    for d, residual, gated in [(300, True, True), (300, False, False), (7, True, False), (7, False, True)]:
        N = 2
        x, r, w, b, z = _ln_case(dtype, N, d, residual, gated, gen)
        xs = [None if t is None else t.double().requires_grad_() for t in (x, r, w, b, z)]
        y = masked_layer_norm_ref(xs[0], xs[1], xs[2], xs[3], xs[4], eps)
        v = xs[0].detach() * (1 if z is None else z.double()) + (0 if r is None else r.double())
        keep = torch.ones(d, dtype=torch.float64) if z is None else (z != 0).double()
        mean, var = row_stats(v, keep, keep.sum().clamp_min(1))
        rstd = torch.rsqrt(var + eps)
        calls.append(Call("cofi_masked_layer_norm_fwd", [code, Buf(x), ptr(r), Buf(w), Buf(b), ptr(z),
                                                         Buf(sentinel((N, d), dtype), out=True),
                                                         Buf(sentinel(N, stat), out=True),
                                                         Buf(sentinel(N, stat), out=True), N, d, eps, None]))
        label = f"d={d} residual={residual} hidden_z={gated}"
        checks.append((f"fwd {label}", {6: y.detach(), 7: mean, 8: rstd}))
        g = torch.randn(N, d, generator=gen, dtype=torch.float64).to(dtype)
        grads = torch.autograd.grad(y, [t for t in xs if t is not None], g.double())
        named = dict(zip([n for n, t in zip("xrwbz", xs) if t is not None], grads))
        outs = [Buf(sentinel((N, d), dtype), out=True), Buf(sentinel((N, d), dtype), out=True) if r is not None else None,
                Buf(sentinel((N, d), stat), out=True), Buf(sentinel((N, d), stat), out=True),
                Buf(sentinel((N, d), stat), out=True) if z is not None else None]
        calls.append(Call("cofi_masked_layer_norm_bwd", [code, Buf(g), Buf(x), ptr(r), Buf(w), Buf(b), ptr(z),
                                                         Buf(mean.to(stat)), Buf(rstd.to(stat)), *outs, N, d, None]))
        chk = {9: named["x"], 11: ("sum", named["w"]), 12: ("sum", named["b"])}
        if r is not None:
            chk[10] = named["r"]
        if z is not None:
            chk[13] = ("sum", named["z"])
        checks.append((f"bwd {label}", chk))
    calls.append(Call("cofi_masked_layer_norm_fwd", [code, Buf(torch.zeros(0, 5, dtype=dtype)), None,
                                                     Buf(torch.ones(5, dtype=dtype)), Buf(torch.zeros(5, dtype=dtype)),
                                                     None, Buf(torch.zeros(0, 5, dtype=dtype)),
                                                     Buf(sentinel(1, stat), out=True), Buf(sentinel(1, stat)), 0, 5, eps,
                                                     None]))
    checks.append(("fwd N=0", {7: sentinel(1, torch.float64)}))
    for call, res, (label, chk) in zip(calls, driver("masked_layer_norm").run(calls), checks):
        assert res.rc == 0, label
        for idx, ref in chk.items():
            got = res.outputs[idx]
            if isinstance(ref, tuple):  # per-row contributions: their column sums are the gradient
                got, ref = got.double().sum(0), ref[1]
            close(got, ref, dtype, f"{label}: argument {idx}", scale=10.0)
        if label.startswith("fwd d") and call.args[5] is None and dtype in (torch.float32, torch.float64):
            assert torch.equal(res.outputs[6][0], call.args[4].tensor), f"{label}: a constant row must normalise to 0"


# ============================== masked_attention =================================================
_ATT_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


class AttCase:
    """Inputs of one attention case and the launch arguments that read them (q, k, v packed in one
    [B, S, 3, H, D] buffer when ``packed``)."""

    def __init__(self, dtype, B, H, S, D, *, z=None, mask=None, dropout=0.0, packed=False, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.dtype, self.B, self.H, self.S, self.D, self.packed = dtype, B, H, S, D, packed
        if packed:
            self.qkv = torch.randn(B, S, 3, H, D, generator=gen, dtype=torch.float64).to(dtype)
            self.q, self.k, self.v = (self.qkv[:, :, i].permute(0, 2, 1, 3) for i in range(3))
        else:
            self.q, self.k, self.v = (torch.randn(B, H, S, D, generator=gen, dtype=torch.float64).to(dtype)
                                      for _ in range(3))
        self.z = None if z is None else torch.tensor(z, dtype=torch.float64).to(dtype)
        self.mask = mask
        self.dropout = dropout
        self.seed = dropout_seed(torch.Generator().manual_seed(seed + 1), torch.device("cpu")) if dropout else None
        self.scale = 1.0 / math.sqrt(D) if D else 1.0
        self.live = (torch.arange(H) if self.z is None else torch.nonzero(self.z.double()).flatten()).to(torch.int32)
        self.thr = dropout_threshold(dropout) if dropout else 0
        self.inv = 1.0 / (1.0 - dropout) if dropout else 1.0

    def strides(self) -> torch.Tensor:
        return torch.tensor([s for t in (self.q, self.k, self.v) for s in t.stride()[:3]], dtype=torch.int64)

    def qkv_args(self) -> list:
        """q, k, v, strides as the first launch arguments after dtype (q at argument index 1)."""
        if self.packed:
            H, D = self.H, self.D
            return [Buf(self.qkv), Alias(1, H * D), Alias(1, 2 * H * D), Buf(self.strides())]
        return [Buf(self.q), Buf(self.k), Buf(self.v), Buf(self.strides())]

    def opt(self, t, dtype=None):
        return None if t is None else Buf(t if dtype is None else t.to(dtype))

    def reference(self):
        """(out, lse, grads dq, dk, dv, g, delta) in float64 from the rounded inputs."""
        q, k, v = (t.double().requires_grad_() for t in (self.q, self.k, self.v))
        z = None if self.z is None else self.z.double()
        out, lse = masked_attention_core_ref(q, k, v, z, self.mask, self.scale, self.dropout, self.seed)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(self.dtype)
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), g.double()) if out.numel() else (q, k, v)
        delta = (g.double() * out.detach()).sum(-1)
        return out.detach(), lse.detach(), (dq, dk, dv), g, delta

    def calls(self) -> tuple[list[Call], dict]:
        B, H, S, D, dt = self.B, self.H, self.S, self.D, self.dtype
        code = _ATT_DTYPES[dt]
        out, lse, (dq, dk, dv), g, delta = self.reference()
        common = [self.opt(self.z), self.opt(None if self.mask is None else self.mask.to(torch.uint8)),
                  self.opt(self.seed), Buf(self.live), int(self.live.numel()), B, H, S, D, self.scale, self.thr,
                  self.inv]
        shape = (B, H, S, D)
        fwd = Call("cofi_masked_attention_fwd_cuda", [code, *self.qkv_args(), *common, Buf(sentinel(shape, dt), out=True),
                                                      Buf(sentinel((B, H, S), torch.float32), out=True), None])
        dlt = Call("cofi_masked_attention_delta_cuda", [code, Buf(g), Buf(out.to(dt)), Buf(self.live),
                                                        int(self.live.numel()), B, H, S, D,
                                                        Buf(sentinel((B, H, S), torch.float32), out=True), None])
        bwd = Call("cofi_masked_attention_bwd_cuda", [code, Buf(g), *self.qkv_args()[:3], self.qkv_args()[3], *common,
                                                      Buf(lse.float()), Buf(delta.float()),
                                                      *(Buf(sentinel(shape, dt), out=True) for _ in range(3)), None])
        # bwd's q is argument 2 (after grad): its aliases point there
        if self.packed:
            bwd.args[3], bwd.args[4] = Alias(2, H * D), Alias(2, 2 * H * D)
        expect = {"out": out, "lse": lse, "delta": delta, "dq": dq, "dk": dk, "dv": dv}
        return [fwd, dlt, bwd], expect


def _check_attention(case: AttCase, results, expect) -> None:
    fwd, dlt, bwd = results
    assert fwd.rc == 0 and dlt.rc == 0 and bwd.rc == 0
    live = case.live.long()
    dead = torch.ones(case.H, dtype=torch.bool)
    dead[live] = False
    dt = case.dtype
    what = f"B{case.B} H{case.H} S{case.S} D{case.D} {dt}"
    got = {"out": fwd.outputs[17], "lse": fwd.outputs[18], "delta": dlt.outputs[9], "dq": bwd.outputs[20],
           "dk": bwd.outputs[21], "dv": bwd.outputs[22]}
    for name, t in got.items():
        assert untouched(t[:, dead]), f"{what}: {name} written on a dead head"
        ref = expect[name][:, live]
        tol_dtype = torch.float32 if name == "lse" else dt  # lse: float32 for every dtype
        scale = 4.0 if name in ("dq", "dk", "dv", "delta") else 1.0
        close(t[:, live], ref, tol_dtype, f"{what} {name}", scale=scale)


def _mask(B, S, pattern):
    m = torch.ones(B, S, dtype=torch.bool)
    if pattern == "pad":
        m[0, S - S // 3:] = False
        if B > 1:
            m[1, ::4] = False
    elif pattern == "batch0_empty":
        m[0] = False
    return m


ATTENTION_CASES = {
    # name: (dtype, B, H, S, D, kwargs) -- each head-dim instantiation (D <= 32, 64, 128), lengths not
    # multiples of the row block (64) or key tile (32), dead heads, padding, a batch with every key
    # masked, dropout, packed QKV. Small: every shuffle is a barrier of real threads here.
    "d8_s1_empty_batch": (torch.float32, 2, 2, 1, 8, dict(mask="batch0_empty")),
    "d32_s33_pad_dead": (torch.float32, 2, 3, 33, 32, dict(z=[0.7, 0.0, 1.3], mask="pad")),
    "d20_s66_dropout": (torch.float32, 1, 2, 66, 20, dict(z=[0.0, 0.4], dropout=0.3, mask="pad")),
    "d128_s9_packed": (torch.float32, 1, 2, 9, 128, dict(packed=True, mask="pad")),
    "d100_s5_all": (torch.float32, 1, 3, 5, 100, dict(z=[0.0, 0.9, 1.0], mask="pad", dropout=0.5, packed=True)),
    "bf16_d64_s20": (torch.bfloat16, 2, 2, 20, 64, dict(z=[1.0, 0.0], mask="pad", dropout=0.2)),
    "f16_d24_s9": (torch.float16, 1, 2, 9, 24, dict(mask="pad", packed=True)),
}


def _att_case(name: str) -> AttCase:
    dtype, B, H, S, D, kw = ATTENTION_CASES[name]
    kw = dict(kw)
    if "mask" in kw:
        kw["mask"] = _mask(B, S, kw["mask"])
    return AttCase(dtype, B, H, S, D, seed=len(name), **kw)


def test_masked_attention():
    """Forward, delta and backward of every case in one driver run."""
    cases = [_att_case(n) for n in ATTENTION_CASES]
    calls, expects = [], []
    for c in cases:
        cs, e = c.calls()
        calls += cs
        expects.append(e)
    results = driver("masked_attention").run(calls)
    for i, (c, e) in enumerate(zip(cases, expects)):
        _check_attention(c, results[3 * i:3 * i + 3], e)


def test_masked_attention_edges():
    """Nothing launched and nothing written for no live head, S = 0 or B = 0; D > 128 is refused;
    D = 0 gives the log of the number of kept keys."""
    dt = torch.float32
    calls, want = [], []
    for B, H, S, D, live in [(2, 2, 5, 8, []), (2, 2, 0, 8, [0, 1]), (0, 2, 5, 8, [0]), (1, 1, 3, 129, [0]),
                             (1, 1, 3, 0, [0])]:
        q = torch.randn(B, H, S, D, dtype=dt)
        st = torch.tensor(list(q.stride()[:3]) * 3, dtype=torch.int64)
        lv = torch.tensor(live, dtype=torch.int32)
        calls.append(Call("cofi_masked_attention_fwd_cuda", [0, Buf(q), Buf(q), Buf(q), Buf(st), None, None, None, Buf(lv),
                                                             len(live), B, H, S, D, 1.0, 0, 1.0,
                                                             Buf(sentinel(q.shape, dt), out=True),
                                                             Buf(sentinel((B, H, S), dt), out=True), None]))
        want.append((B, H, S, D))
    res = driver("masked_attention").run(calls)
    for r, (B, H, S, D) in zip(res, want):
        if D > 128:
            assert r.rc == CUDA_INVALID_VALUE
        else:
            assert r.rc == 0
        if D == 0 and S:
            torch.testing.assert_close(r.outputs[18], torch.full((B, H, S), math.log(S)))
        else:
            assert untouched(r.outputs[17]) and untouched(r.outputs[18])


# ============================== ThreadSanitizer: one shape per kernel ============================
def test_tsan_hard_concrete():
    la, u, g = _hc_inputs(600, torch.float32, seed=3)
    n, t, l, r = 600, TEMPERATURE, LIMIT_L, LIMIT_R
    calls = [Call("cofi_hc_sample_fwd_f32", [Buf(la), Buf(u), Buf(sentinel(n, la.dtype), out=True), n, t, l, r, None]),
             Call("cofi_hc_sample_bwd_f32", [Buf(g), Buf(la), Buf(u), Buf(sentinel(n, la.dtype), out=True), n, t, l, r,
                                             None]),
             Call("cofi_hc_keep_fwd_f32", [Buf(la), Buf(sentinel(n, la.dtype), out=True), n, 0.5, EPS, None]),
             Call("cofi_hc_keep_bwd_f32", [Buf(g), Buf(la), Buf(sentinel(n, la.dtype), out=True), n, 0.5, EPS, None])]
    assert [r.rc for r in driver("hard_concrete", "thread").run(calls)] == [0] * 4


def test_tsan_masked_ffn():
    N, L = 3, 100
    h, g = torch.randn(N, L), torch.randn(N, L)
    b1, s = torch.randn(L), torch.rand(L)
    calls = [Call("cofi_masked_ffn_fwd_epilogue", [0, Buf(h.clone(), out=True), Buf(sentinel((N, L), h.dtype), out=True),
                                                   Buf(b1), Buf(s), N, L, 0, None]),
             Call("cofi_masked_ffn_bwd_epilogue", [0, Buf(h), Buf(g, out=True), Alias(2), Buf(h.clone(), out=True),
                                                   Buf(h.clone(), out=True), Buf(s), N, L, 1, None])]
    assert [r.rc for r in driver("masked_ffn", "thread").run(calls)] == [0, 0]


def test_tsan_masked_ffn_gated():
    N, L = 3, 100
    H, G, s = torch.randn(N, 2 * L), torch.randn(N, L), torch.rand(L)
    calls = [Call("cofi_masked_ffn_gated_fwd_epilogue", [0, Buf(H.clone(), out=True),
                                                         Buf(sentinel((N, L), H.dtype), out=True), Buf(torch.randn(2 * L)),
                                                         Buf(s), N, L, 3, None]),
             Call("cofi_masked_ffn_gated_bwd_epilogue", [0, Buf(H), Buf(G), Buf(H.clone(), out=True),
                                                         Buf(G.clone(), out=True), Buf(G.clone(), out=True), Buf(s), N, L,
                                                         3, None])]
    assert [r.rc for r in driver("masked_ffn", "thread").run(calls)] == [0, 0]


def test_tsan_masked_layer_norm():
    N, d = 2, 300
    x, r, g = torch.randn(N, d), torch.randn(N, d), torch.randn(N, d)
    w, b, z = torch.randn(d), torch.randn(d), torch.rand(d)
    z[::4] = 0
    out = lambda *s: Buf(sentinel(s, torch.float32), out=True)  # noqa: E731
    calls = [Call("cofi_masked_layer_norm_fwd", [0, Buf(x), Buf(r), Buf(w), Buf(b), Buf(z), out(N, d), out(N), out(N),
                                                 N, d, 1e-5, None]),
             Call("cofi_masked_layer_norm_bwd", [0, Buf(g), Buf(x), Buf(r), Buf(w), Buf(b), Buf(z), Buf(torch.zeros(N)),
                                                 Buf(torch.ones(N)), out(N, d), out(N, d), out(N, d), out(N, d),
                                                 out(N, d), N, d, None])]
    assert [r.rc for r in driver("masked_layer_norm", "thread").run(calls)] == [0, 0]


def test_tsan_masked_attention():
    """Forward, delta, dK/dV and dQ kernels on the D <= 64 instantiation (results checked too)."""
    case = AttCase(torch.float32, 1, 2, 40, 48, z=[0.8, 0.0], mask=_mask(1, 40, "pad"), dropout=0.25, seed=5)
    calls, expect = case.calls()
    _check_attention(case, driver("masked_attention", "thread").run(calls), expect)


# ============================== the harness finds bugs ===========================================
SELFTEST = Path(__file__).resolve().parent / "cuda_host_selftest.cu"


def _selftest(sanitizer: str) -> harness.Driver:
    why = harness.unavailable(sanitizer)
    if why:
        pytest.skip(f"host harness ({sanitizer}): {why}")
    return harness.Driver(harness.build_source(SELFTEST, sanitizer, "selftest"), sanitizer, timeout=60)


def test_selftest_thread_sanitizer_reports_a_race():
    drv = _selftest("thread")
    (ok,) = drv.run([Call("cofi_selftest_good", [Buf(torch.zeros(64), out=True)])])
    expect = sum((i + 1) % 64 for i in range(32)) + torch.zeros(32)  # lanes of a warp sum their neighbours
    assert ok.rc == 0 and torch.equal(ok.outputs[0][:32], expect)
    with pytest.raises(harness.HarnessError, match="data race"):
        drv.run([Call("cofi_selftest_racy", [Buf(torch.zeros(64), out=True)])])


def test_selftest_address_sanitizer_and_barriers():
    drv = _selftest("address")
    with pytest.raises(harness.HarnessError, match="heap-buffer-overflow"):
        drv.run([Call("cofi_selftest_out_of_bounds", [Buf(torch.zeros(8)), Buf(torch.zeros(8), out=True), 8])])
    with pytest.raises(harness.HarnessError, match="divergent __syncthreads"):
        drv.run([Call("cofi_selftest_divergent", [Buf(torch.zeros(64), out=True)])])
    (bad,) = drv.run([Call("cofi_selftest_bad_config", [Buf(torch.zeros(64), out=True)])])
    assert bad.rc == 9  # cudaErrorInvalidConfiguration: 2,048 threads per block
