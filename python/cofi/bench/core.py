"""One op benchmark as data (``OpBench``) and the loop that checks and times its providers.

For every case the loop first computes the reference provider on float32 copies of the inputs
(output and gradients), then for every provider: one checked call (a provider whose output or
gradients are off is reported, not timed; a cofi backend that cannot run this call is reported with
its reason), then p20/p50/p80 of each mode: ``fwd`` (no grad) and ``fwd_bwd`` (forward, then the
gradients of every input that requires grad). Ratios ``vs_<baseline>`` = baseline p50 / provider p50
are taken between providers of the same case and mode in this run only. The provider ``auto`` would
pick (the op called with no backend) is marked in each row's ``auto``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from .. import ops
from ..ops import _backends as B
from . import harness as H

MODES = ("fwd", "fwd_bwd")


@dataclass
class Settings:
    """What ``cofi bench`` was asked for."""

    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    quick: bool = False
    min_run_time: float | None = None  # seconds of timing per provider and mode (None: by quick)

    @property
    def run_time(self) -> float:
        return self.min_run_time if self.min_run_time is not None else (0.2 if self.quick else 1.0)


@dataclass
class Provider:
    """One implementation timed on every case: ``fn(*case.args) -> tensor``."""

    name: str
    fn: Callable[..., torch.Tensor]
    backend: str | None = None  # the cofi backend it forces (None: plain torch, e.g. the eager reference)
    compare: int | None = None  # check only the first n of (out, *grads) (None: all)
    ran_op: str | None = None  # the cofi op whose last backend it reports (None: the bench's ran_op)


@dataclass
class Case:
    """One input set. ``wrt``: indices of the args the fwd_bwd mode differentiates."""

    label: str
    shape: dict
    args: tuple
    wrt: tuple[int, ...]
    metrics: Callable[[str, float], dict] = field(default=lambda mode, ms: {})
    ran_op: str | None = None  # the cofi op this case runs, when not the bench's ran_op (gated masked_ffn)


@dataclass
class OpBench:
    """An op's benchmark: its cases, providers, baselines for the ratios, and how auto is called."""

    op: str  # row "op" and the results file's name
    ran_op: str  # the cofi op whose ops.last_backend tells which backend ran
    cases: Callable[[Settings], Iterable[Case]]
    providers: Callable[[Settings], list[Provider]]
    auto: Callable[..., torch.Tensor]  # the op with backend=None, same arguments as the providers
    baselines: tuple[str, ...] = ("reference",)
    modes: tuple[str, ...] = MODES
    dtypes: tuple[torch.dtype, ...] | None = None  # None: any float dtype; else runs in the first one
    doc: str = ""


def _copy(args: tuple, dtype: torch.dtype) -> tuple:
    """args with floating tensors detached and cast to ``dtype`` (requires_grad kept)."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            a = a.detach().to(dtype).requires_grad_(a.requires_grad)
        out.append(a)
    return tuple(out)


def _call(fn: Callable[..., torch.Tensor], args: tuple, wrt: tuple[int, ...], grad: bool) -> list:
    if not grad:
        with torch.no_grad():
            return [fn(*args)]
    out = fn(*args)
    leaves = [args[i] for i in wrt]
    gs = torch.autograd.grad(out, leaves, torch.ones_like(out) if out.dim() == 0 else _grad_out(out),
                             allow_unused=True)
    return [out, *gs]


_GO: dict[tuple, torch.Tensor] = {}


def _grad_out(out: torch.Tensor) -> torch.Tensor:
    """A fixed random upstream gradient for ``out`` (same for every provider of a case)."""
    key = (tuple(out.shape), out.dtype, out.device)
    if key not in _GO:
        g = torch.Generator().manual_seed(1234)
        _GO[key] = torch.randn(out.shape, generator=g).to(out.device, out.dtype)
    return _GO[key]


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def run(bench: OpBench, s: Settings) -> list[dict]:
    """Check and time every provider of ``bench`` on every case; returns result rows."""
    dtype = s.dtype if bench.dtypes is None or s.dtype in bench.dtypes else bench.dtypes[0]
    s = Settings(s.device, dtype, s.quick, s.min_run_time)
    dname = str(dtype).replace("torch.", "")
    env = H.env_tags(s.device)
    rows: list[dict] = []
    _GO.clear()
    for case in bench.cases(s):
        providers = bench.providers(s)
        ref = next(p for p in providers if p.name == "reference")
        want = _call(ref.fn, _copy(case.args, torch.float32), case.wrt, grad=True)
        auto_ran = None
        try:
            bench.auto(*case.args)
            auto_ran = ops.last_backend(case.ran_op or bench.ran_op)
        except B.BackendError:
            pass
        base = {"op": bench.op, "shape": case.shape, "dtype": dname, "case": case.label}
        times: dict[tuple[str, str], float] = {}
        case_rows = []
        for p in providers:
            try:
                got = _call(p.fn, case.args, case.wrt, grad="fwd_bwd" in bench.modes)
            except B.BackendError as e:
                case_rows += [{**base, "provider": p.name, "backend_ran": p.backend, "mode": m,
                               "skipped": _one_line(e), **env} for m in bench.modes]
                continue
            ran = ops.last_backend(p.ran_op or case.ran_op or bench.ran_op) if p.backend else "eager"
            n = p.compare if p.compare is not None else len(want)
            err = H.check_rel(p.name, got[:n], want[:n], dtype)
            for mode in bench.modes:
                row = {**base, "provider": p.name, "backend_ran": ran, "mode": mode}
                if p.backend and p.backend == auto_ran and p.ran_op is None:
                    row["auto"] = True
                if err:
                    case_rows.append({**row, "error": err, **env})
                    continue
                t = H.measure(lambda fn=p.fn, c=case, m=mode: _call(fn, c.args, c.wrt, m == "fwd_bwd"),
                              s.run_time, s.device)
                times[(p.name, mode)] = t["p50_ms"]
                case_rows.append({**row, **t, **case.metrics(mode, t["p50_ms"]), **env})
        for r in case_rows:
            if "p50_ms" not in r:
                continue
            for b in bench.baselines:
                tb = times.get((b, r["mode"]))
                r[f"vs_{b}"] = round(tb / r["p50_ms"], 3) if tb else None
        rows += case_rows
    return rows


def table_rows(rows: list[dict], baselines: tuple[str, ...]) -> list[dict]:
    """Rows as printed by ``cofi bench``: times and ratios formatted, skips and errors explained."""
    out = []
    for r in rows:
        cell = {"op": r["op"], "case": r.get("case", ""), "mode": r["mode"], "dtype": r["dtype"],
                "provider": r["provider"] + (" *" if r.get("auto") else ""), "ran": r.get("backend_ran") or ""}
        if "p50_ms" in r:
            cell["p50 ms"] = f"{r['p50_ms']:.3f}"
            for b in baselines:
                v = r.get(f"vs_{b}")
                cell[f"vs {b}"] = "-" if v is None else f"{v:.2f}x"
        else:
            cell["p50 ms"] = "not run: " + (r.get("skipped") or r.get("error", ""))
        out.append(cell)
    return out
