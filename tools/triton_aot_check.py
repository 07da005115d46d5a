"""Ahead-of-time compile every shipped Triton kernel configuration for sm_90 (H100), no GPU needed.

For each kernel and configuration (``cofi_kernels/configs.py``) this reports the shared memory the
compiler allocates (``compiled.metadata.shared``), the registers and spill bytes ptxas reports
(``ptxas -v``), and, for attention, the static estimate the backend check uses. It fails (exit 1)
when a kernel needs more than 232,448 B (227 KB) of shared memory, fails to compile, needs more
shared memory than its static estimate, or spills under the Triton release the tiles were tuned
with (``TUNED_TRITON``; ptxas input differs between releases, so under another one a spill is
printed as a warning: retune there with ``--spills fail``) (the estimate is what keeps ``auto`` from routing
an unfitting call to Triton).

Exit codes: 0 all configurations fit; 1 a check failed; 3 this machine cannot compile for sm_90
(no CUDA backend or ptxas): the static estimates alone are printed and checked (a failing
estimate still exits 1).

Usage::

    python tools/triton_aot_check.py [--quick] [--jobs N] [--filter TEXT] [--json PATH]

Attention is compiled with every optional feature on (gate, padding mask, dropout); fp16 shares
the bf16 tiles and is compiled with ``--all-dtypes`` only. Compile results are not cached (a
fresh Triton cache per run), so ptxas always runs and reports registers and spills.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMEM_LIMIT = 232_448
ARCH = 90
WARP_SIZE = 32
EXIT_NO_TOOLCHAIN = 3
TUNED_TRITON = "3.9"  # the release whose compiler the attention tiles were chosen spill-free with

_TT = {"fp16": "fp16", "bf16": "bf16", "fp32": "fp32", "fp64": "fp64"}
_TORCH = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32", "fp64": "float64"}


@dataclass
class Spec:
    """One kernel compile: ``module.kernel`` with a signature, constexprs and launch options."""

    module: str
    kernel: str
    config: str
    signature: dict[str, str]
    constexprs: dict[str, object]
    options: dict[str, int]
    estimate: int | None = None


@dataclass
class Result:
    spec: Spec
    shared: int | None = None
    regs: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack: int | None = None
    seconds: float = 0.0
    error: str | None = None
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


# ============================== the shipped configurations =======================================

def _sig(fn_args: list[str], ptr: str, overrides: dict[str, str], constexprs: dict[str, object]) -> dict[str, str]:
    """Signature: ``*ptr`` for ``*_ptr`` arguments, i32 for other scalars, then ``overrides``."""
    sig = {a: (f"*{ptr}" if a.endswith("_ptr") else "i32") for a in fn_args}
    sig.update(overrides)
    sig.update({k: "constexpr" for k in constexprs})
    return sig


def attention_specs(dtypes: list[str]) -> list[Spec]:
    import torch

    from cofi_kernels import configs as C
    from cofi_kernels import masked_attention as K

    cls_of = {"fp16": "half", "bf16": "half", "fp32": "fp32", "fp64": "fp64"}
    scalars = dict(scale="fp32", inv="fp32", thr="i64", seed_ptr="*i64", live_ptr="*i32", mask_ptr="*i1",
                   lse_ptr="*fp32", delta_ptr="*fp32", z_ptr="*fp32")
    out = []
    for (cls, bd), tiles in sorted(C.ATTENTION_GPU.items()):
        for dt in dtypes:
            if cls_of[dt] != cls:
                continue
            cfg = C.AttentionConfig(bd, *tiles)
            est = C.attention_smem_bytes(getattr(torch, _TORCH[dt]), cfg)
            # causal and non-causal are different programs (constexpr branches): both must fit
            for causal in (False, True):
                for name, key in (("_masked_attention_fwd_kernel", "fwd"), ("_masked_attention_bwd_kernel", "dkdv"),
                                  ("_masked_attention_bwd_dq_kernel", "dq")):
                    t = getattr(cfg, key)
                    fn = getattr(K, name)
                    const = dict(HAS_Z=True, HAS_MASK=True, DROPOUT=True, CAUSAL=causal, ACC="fp32",
                                 PREC="ieee" if dt == "fp32" else "tf32", BLOCK_M=t.block_m, BLOCK_N=t.block_n,
                                 BLOCK_D=bd)
                    sig = _sig(fn.arg_names, _TT[dt], {k: v for k, v in scalars.items() if k in fn.arg_names},
                               const)
                    out.append(Spec("cofi_kernels.masked_attention", name,
                                    f"{dt} {t.block_m}x{t.block_n}x{bd} w{t.num_warps} s{t.num_stages}"
                                    + (" causal" if causal else ""), sig, const,
                                    dict(num_warps=t.num_warps, num_stages=t.num_stages), est[key]))
    return out


def ffn_specs(dtypes: list[str]) -> list[Spec]:
    from cofi_kernels import configs as C
    from cofi_kernels import masked_ffn as K
    from cofi_kernels import masked_ffn_gated as KG

    c = C.FFN_GEMM
    tiles = dict(BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k)
    opts = dict(num_warps=c.num_warps, num_stages=c.num_stages)
    out = []
    for dt in dtypes:
        acc = "fp64" if dt == "fp64" else "fp32"
        ieee = dt in ("fp32", "fp64")
        for name, extra in (("_masked_ffn_fwd_kernel", dict(ACT=0)), ("_masked_ffn_fwd_kernel", dict(ACT=1)),
                            ("_masked_ffn_bwd_kernel", dict(ACT=0)), ("_masked_ffn_bwd_kernel", dict(ACT=1)),
                            ("_gather_gemm_kernel", dict(IDX=0, HAS_BIAS=False)),
                            ("_gather_gemm_kernel", dict(IDX=1, HAS_BIAS=True)),
                            ("_gather_gemm_kernel", dict(IDX=2, HAS_BIAS=False)),
                            ("_gated_fwd_kernel", dict(ACT=3)), ("_gated_bwd_kernel", dict(ACT=3))):
            mod = KG if name.startswith("_gated") else K
            fn = getattr(mod, name)
            const = dict(extra, ACC=acc, IEEE=ieee, **tiles)
            sig = _sig(fn.arg_names, _TT[dt], {"idx_ptr": "*i64"}, const)
            label = " ".join(f"{k}={v}" for k, v in extra.items())
            out.append(Spec(mod.__name__, name,
                            f"{dt} {c.block_m}x{c.block_n}x{c.block_k} w{c.num_warps} s{c.num_stages} {label}",
                            sig, const, opts))
    return out


# Row widths checked: hidden sizes up to 2048 (1024 in float64). Wider rows run, but the backward
# spills a little (4096: 8 B; float64 2048: 80 B with Triton 3.9), see configs.layer_norm_num_warps.
LAYER_NORM_BLOCK_D = {"fp16": (1024, 2048), "bf16": (1024, 2048), "fp32": (1024, 2048), "fp64": (1024,)}


def _norm_specs(dtypes: list[str], module: str, fwd, fwd_const: dict, fwd_args: dict, bwd, bwd_const: dict,
                bwd_args: dict, rows: int) -> list[Spec]:
    """The forward and backward specs of a row-norm kernel pair at every row width of LAYER_NORM_BLOCK_D;
    ``{stat}`` in an argument type is the statistics dtype (fp64 for fp64 inputs, else fp32)."""
    import torch

    from cofi_kernels import configs as C

    out = []
    for dt in dtypes:
        stat = "fp64" if dt == "fp64" else "fp32"
        for bd in LAYER_NORM_BLOCK_D[dt]:
            w = C.layer_norm_num_warps(bd, getattr(torch, _TORCH[dt]))
            for fn, const, args, label in ((fwd, fwd_const, fwd_args, f"{dt} D={bd} w{w}"),
                                           (bwd, bwd_const, bwd_args, f"{dt} D={bd} w{w} rows={rows}")):
                const = dict(const, BLOCK_D=bd)
                sig = _sig(fn.arg_names, _TT[dt], {k: v.format(stat=stat) for k, v in args.items()}, const)
                out.append(Spec(module, fn.__name__, label, sig, const, dict(num_warps=w)))
    return out


def layer_norm_specs(dtypes: list[str]) -> list[Spec]:
    from cofi_kernels import configs as C
    from cofi_kernels import masked_layer_norm as K

    return _norm_specs(dtypes, "cofi_kernels.masked_layer_norm",
                       K._masked_layer_norm_fwd_kernel, dict(HAS_R=True, HAS_Z=True),
                       dict(mean_ptr="*{stat}", rstd_ptr="*{stat}", eps="fp32"),
                       K._masked_layer_norm_bwd_kernel,
                       dict(HAS_R=True, HAS_Z=True, WANT_DX=True, WANT_DR=True, ROWS_PER=C.LAYER_NORM_ROWS),
                       dict(mean_ptr="*{stat}", rstd_ptr="*{stat}", cols_ptr="*{stat}"), C.LAYER_NORM_ROWS)


def rms_norm_specs(dtypes: list[str]) -> list[Spec]:
    """masked_rms_norm: the layer norm's row widths and launch options, every optional input on."""
    from cofi_kernels import masked_rms_norm as K

    return _norm_specs(dtypes, "cofi_kernels.masked_rms_norm",
                       K._masked_rms_norm_fwd_kernel, dict(HAS_R=True, HAS_Z=True, WANT_S=True),
                       dict(rstd_ptr="*{stat}", eps="fp32"),
                       K._masked_rms_norm_bwd_kernel,
                       dict(HAS_GS=True, HAS_R=True, HAS_Z=True, WANT_DX=True, WANT_DR=True, ROWS_PER=K.ROWS),
                       dict(rstd_ptr="*{stat}", cols_ptr="*{stat}"), K.ROWS)


def hard_concrete_specs(dtypes: list[str]) -> list[Spec]:
    from cofi_kernels import hard_concrete as K

    out = []
    for dt in dtypes:
        for fn in (K._hard_concrete_sample_fwd_kernel, K._hard_concrete_sample_bwd_kernel,
                   K._hard_concrete_keep_prob_fwd_kernel, K._hard_concrete_keep_prob_bwd_kernel):
            const = dict(BLOCK=K.BLOCK)
            out.append(Spec("cofi_kernels.hard_concrete", fn.__name__, f"{dt} BLOCK={K.BLOCK}",
                            _sig(fn.arg_names, _TT[dt], {}, const), const, {}))
        fn = K._hard_concrete_rank_kernel
        const = dict(BLOCK_I=64, BLOCK_J=64)
        out.append(Spec("cofi_kernels.hard_concrete", fn.__name__, f"{dt} 64x64",
                        _sig(fn.arg_names, _TT[dt], {"rank_ptr": "*i32"}, const), const, {}))
        fn = K._gated_rowsum_kernel
        for block in (128, 256):
            const = dict(HAS_GATE=False, BLOCK=block)
            out.append(Spec("cofi_kernels.hard_concrete", fn.__name__, f"{dt} BLOCK={block}",
                            _sig(fn.arg_names, _TT[dt], {}, const), const, {}))
    return out


def all_specs(quick: bool, all_dtypes: bool) -> list[Spec]:
    half = ["fp16", "bf16"] if all_dtypes else ["bf16"]
    specs = (attention_specs(half + ["fp32"]) + ffn_specs(half + ["fp32", "fp64"])
             + layer_norm_specs(half + ["fp32", "fp64"]) + rms_norm_specs(half + ["fp32", "fp64"])
             + hard_concrete_specs(["fp32", "fp64"]))
    if quick:
        # one small configuration per kernel: proves the toolchain and every kernel's codegen
        seen: set[str] = set()
        keep = []
        for s in sorted(specs, key=lambda s: (s.estimate or 0, s.config)):
            if s.kernel not in seen:
                seen.add(s.kernel)
                keep.append(s)
        specs = keep
    return specs


# ============================== compiling =========================================================

def _constexpr_value(v: object) -> object:
    import triton.language as tl

    return {"fp32": tl.float32, "fp64": tl.float64}.get(v, v) if isinstance(v, str) else v


def _target():
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", ARCH, WARP_SIZE)


def _parse_ptxas(log: str) -> dict[str, int | None]:
    def grab(pat: str) -> int | None:
        m = re.search(pat, log)
        return int(m.group(1)) if m else None

    return dict(regs=grab(r"Used (\d+) registers"), spill_stores=grab(r"(\d+) bytes spill stores"),
                spill_loads=grab(r"(\d+) bytes spill loads"), stack=grab(r"(\d+) bytes stack frame"))


def compile_spec(spec: Spec) -> Result:
    """Compile one spec for sm_90 in this process (a worker)."""
    import importlib

    import triton
    from triton import knobs

    res = Result(spec)
    t0 = time.perf_counter()
    try:
        fn = getattr(importlib.import_module(spec.module), spec.kernel)
        const = {k: _constexpr_value(v) for k, v in spec.constexprs.items()}
        knobs.nvidia.dump_ptxas_log = True
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            compiled = triton.compile(triton.compiler.ASTSource(fn=fn, signature=spec.signature, constexprs=const),
                                      target=_target(), options=dict(spec.options))
        res.shared = int(compiled.metadata.shared)
        for k, v in _parse_ptxas(buf.getvalue()).items():
            setattr(res, k, v)
    except Exception as e:  # reported per kernel; the run fails
        res.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:300]
    res.seconds = time.perf_counter() - t0
    return res


def _init_worker(cache_dir: str) -> None:
    os.environ["TRITON_CACHE_DIR"] = cache_dir


def toolchain_error() -> str | None:
    """Why this machine cannot compile Triton kernels for sm_90 (None = it can)."""
    try:
        import triton
        import triton.language as tl
        from triton.backends import backends

        if "nvidia" not in backends:
            return "triton has no nvidia backend in this install"

        @triton.jit
        def _probe(x_ptr, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            tl.store(x_ptr + offs, tl.load(x_ptr + offs) + 1.0)

        with contextlib.redirect_stdout(io.StringIO()):
            triton.compile(triton.compiler.ASTSource(fn=_probe, signature={"x_ptr": "*fp32", "BLOCK": "constexpr"},
                                                     constexprs={"BLOCK": 128}), target=_target())
    except Exception as e:
        return f"{type(e).__name__}: {str(e).strip()[:400]}"
    return None


def check(res: Result, spills_fail: bool) -> None:
    if res.error:
        res.problems.append(f"compile failed: {res.error}")
        return
    if res.shared is not None and res.shared > SMEM_LIMIT:
        res.problems.append(f"shared memory {res.shared} B > {SMEM_LIMIT} B")
    if (res.spill_stores or 0) > 0 or (res.spill_loads or 0) > 0:
        spill = f"spills {res.spill_stores} B stores / {res.spill_loads} B loads"
        (res.problems if spills_fail else res.warnings).append(spill)
    if res.spec.estimate is not None and res.shared is not None and res.shared > res.spec.estimate:
        res.problems.append(f"shared memory {res.shared} B > static estimate {res.spec.estimate} B")


def _fmt(v: object) -> str:
    return "-" if v is None else str(v)


def print_table(results: list[Result], compiled: bool) -> None:
    head = ("kernel", "config", "smem B", "est B", "regs", "spill st/ld B", "s", "status")
    rows = []
    for r in results:
        s = r.spec
        spill = "-" if r.spill_stores is None else f"{r.spill_stores}/{r.spill_loads}"
        rows.append((s.kernel, s.config, _fmt(r.shared), _fmt(s.estimate), _fmt(r.regs), spill,
                     f"{r.seconds:.1f}" if compiled else "-",
                     "; ".join(r.problems + [f"warning: {w}" for w in r.warnings]) or "ok"))
    widths = [max(len(str(x[i])) for x in rows + [head]) for i in range(len(head))]
    for row in [head] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())


def static_check(specs: list[Spec]) -> list[Result]:
    out = []
    for s in specs:
        r = Result(s)
        if s.estimate is not None and s.estimate > SMEM_LIMIT:
            r.problems.append(f"static estimate {s.estimate} B > {SMEM_LIMIT} B")
        out.append(r)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one (smallest) configuration per kernel")
    ap.add_argument("--all-dtypes", action="store_true", help="also fp16 (same tiles as bf16)")
    ap.add_argument("--filter", default="", help="only kernels / configs containing this text")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--spills", choices=("auto", "fail", "warn"), default="auto",
                    help=f"auto: spills fail under Triton {TUNED_TRITON}.x (the tuned release), warn otherwise")
    args = ap.parse_args(argv)

    specs = [s for s in all_specs(args.quick, args.all_dtypes) if args.filter in f"{s.kernel} {s.config}"]
    why = toolchain_error()
    if why is not None:
        print(f"cannot compile for sm_{ARCH} on this machine: {why}")
        print("checking the static shared-memory estimates only")
        results = static_check(specs)
        print_table(results, compiled=False)
        return 1 if any(r.problems for r in results) else EXIT_NO_TOOLCHAIN

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cofi-aot-") as cache:
        with ProcessPoolExecutor(max(1, args.jobs), initializer=_init_worker, initargs=(cache,)) as ex:
            results = list(ex.map(compile_spec, specs))
    import triton

    tuned = triton.__version__.startswith(TUNED_TRITON + ".")
    spills_fail = args.spills == "fail" or (args.spills == "auto" and tuned)
    for r in results:
        check(r, spills_fail)
    print(f"Triton AOT check for sm_{ARCH}: {len(results)} kernel configurations, "
          f"{time.perf_counter() - t0:.0f} s with {args.jobs} jobs, Triton {triton.__version__} "
          f"(spills {'fail' if spills_fail else f'warn: tiles tuned with {TUNED_TRITON}.x'})")
    print_table(results, compiled=True)
    bad = [r for r in results if r.problems]
    if args.json:
        args.json.write_text(json.dumps([dict(asdict(r), spec=dict(asdict(r.spec), constexprs={
            k: str(v) for k, v in r.spec.constexprs.items()})) for r in results], indent=1))
    print(f"{len(bad)} failing" if bad else "all fit")
    return 1 if bad else 0


if __name__ == "__main__":
    # Before cofi_kernels is imported: the interpreter replaces @triton.jit functions, and this tool
    # compiles the real ones (worker processes inherit the environment).
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    sys.exit(main())
