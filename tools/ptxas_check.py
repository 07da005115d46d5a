"""ptxas resource check of the CUDA kernels (csrc/*/*_cuda.cu) for sm_90, no GPU needed.

Each source is compiled with nvcc as setup.py compiles it (``-O3 --use_fast_math``, torch's common
nvcc flags, ``-DCOFI_WITH_CUDA=1``) plus ``-Xptxas -v``; for every kernel instantiation the tool
prints one line: registers, stack frame, spill stores / loads and static shared memory. It fails
(exit 1) when a kernel of a strict op (default: masked_attention) uses local memory (a stack frame or
spills: register arrays that ptxas could not keep in registers) or when a compile fails; local memory
elsewhere is reported as a warning. Exit 3 when nvcc is missing (nothing checked).

Usage::

    python tools/ptxas_check.py [--arch 90] [--strict OP ...] [--filter TEXT] [--jobs N] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXIT_NO_TOOLCHAIN = 3
# torch.utils.cpp_extension.COMMON_NVCC_FLAGS (used when torch is not importable; same in 2.13 / 2.14)
_TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                     "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr"]


@dataclass
class Kernel:
    """ptxas's report of one kernel instantiation."""

    op: str
    name: str
    regs: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    smem: int = 0

    @property
    def local_memory(self) -> bool:
        return self.stack > 0 or self.spill_stores > 0 or self.spill_loads > 0


def nvcc_flags(arch: int) -> list[str]:
    """setup.py's release nvcc flags for one architecture."""
    try:
        from torch.utils.cpp_extension import COMMON_NVCC_FLAGS as common
    except Exception:  # noqa: BLE001 - torch absent or broken: the pinned copy
        common = _TORCH_NVCC_FLAGS
    return ["-O3", "--use_fast_math", *common, "-DCOFI_WITH_CUDA=1", "-std=c++17",
            f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v"]


def find_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    cand = Path(home) / "bin" / "nvcc"
    return str(cand) if cand.exists() else shutil.which("nvcc")


_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(log: str, op: str) -> list[Kernel]:
    """Kernels of one ``-Xptxas -v`` log (entry functions only; device functions are inlined)."""
    kernels: list[Kernel] = []
    cur: Kernel | None = None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            cur = Kernel(op, m.group(1))
            kernels.append(cur)
        elif cur is not None and (m := _FRAME.search(line)):
            cur.stack, cur.spill_stores, cur.spill_loads = map(int, m.groups())
        elif cur is not None and (m := _USED.search(line)):
            cur.regs = int(m.group(1))
            if s := _SMEM.search(line):
                cur.smem = int(s.group(1))
    return kernels


def demangle(names: list[str]) -> list[str]:
    """Readable kernel names: c++filt's, without the anonymous namespace and the parameter list."""
    out = names
    if shutil.which("c++filt") and names:
        proc = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
        if proc.returncode == 0 and len(proc.stdout.splitlines()) == len(names):
            out = proc.stdout.splitlines()
    short = []
    for n in out:
        n = n.replace("(anonymous namespace)::", "")
        depth, cut = 0, len(n)
        for i, ch in enumerate(n):  # the parameter list starts at the first '(' outside <...>
            depth += ch == "<"
            depth -= ch == ">"
            if ch == "(" and depth == 0:
                cut = i
                break
        short.append(n[:cut].replace("void ", "", 1).replace("__nv_bfloat16", "bf16").replace("__half", "half"))
    return short


def compile_source(nvcc: str, src: Path, arch: int) -> tuple[list[Kernel], str | None, float]:
    """(kernels, error, seconds) of one .cu."""
    op = src.parent.name
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, *nvcc_flags(arch), f"-I{src.parent}", "-c", str(src), "-o", str(Path(tmp) / "k.o")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    secs = time.perf_counter() - t0
    if proc.returncode != 0:
        return [], (proc.stderr.strip().splitlines() or ["nvcc failed"])[-1], secs
    kernels = parse_ptxas(proc.stdout + proc.stderr, op)
    for k, n in zip(kernels, demangle([k.name for k in kernels])):
        k.name = n
    return kernels, None, secs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--strict", action="append", default=None,
                    help="op whose kernels must not use local memory (repeatable; default masked_attention)")
    ap.add_argument("--filter", default="", help="only sources whose path contains this text")
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--json", type=Path, help="also write the results as JSON")
    args = ap.parse_args(argv)
    strict = set(args.strict or ["masked_attention"])
    nvcc = find_nvcc()
    if nvcc is None:
        print("ptxas check: no nvcc (set CUDA_HOME); nothing checked")
        return EXIT_NO_TOOLCHAIN
    sources = [p for p in sorted(ROOT.glob("csrc/*/*_cuda.cu")) if args.filter in str(p)]
    if not sources:
        print(f"error: no csrc/*/*_cuda.cu matches --filter {args.filter!r}", file=sys.stderr)
        return 1
    print(f"ptxas check for sm_{args.arch}: {len(sources)} sources, {nvcc}; local memory fails in: "
          f"{', '.join(sorted(strict))}")
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(lambda s: compile_source(nvcc, s, args.arch), sources))
    failures, warnings, kernels = [], [], []
    rows = [("op", "kernel", "regs", "stack", "spill st", "spill ld", "smem", "")]
    for src, (ks, err, secs) in zip(sources, results):
        if err:
            failures.append(f"{src.relative_to(ROOT)}: compile failed: {err}")
            rows.append((src.parent.name, "(compile failed)", "", "", "", "", "", "FAIL"))
            continue
        for k in ks:
            verdict = "ok"
            if k.local_memory:
                verdict = "FAIL local memory" if k.op in strict else "warn local memory"
                (failures if k.op in strict else warnings).append(
                    f"{k.op} {k.name}: {k.stack} B stack, {k.spill_stores} B spill stores, {k.spill_loads} B spill loads")
            rows.append((k.op, k.name, k.regs, k.stack, k.spill_stores, k.spill_loads, k.smem, verdict))
            kernels.append(k)
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    for w in warnings:
        print(f"warning: {w}")
    for f in failures:
        print(f"FAIL: {f}")
    print(f"ptxas check: {len(kernels)} kernels, {sum(k.local_memory for k in kernels)} with local memory, "
          f"{len(failures)} failing" if failures else
          f"ptxas check: {len(kernels)} kernels, {sum(k.local_memory for k in kernels)} with local memory "
          f"(none in {', '.join(sorted(strict))}): OK")
    if args.json:
        args.json.write_text(json.dumps([asdict(k) for k in kernels], indent=1) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
