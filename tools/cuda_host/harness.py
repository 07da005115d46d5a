"""Build the host harness of one op's CUDA source and call its launchers on torch tensors.

``build(op, sanitizer)`` hostifies ``csrc/<op>/<op>_cuda.cu`` (hostify.py), compiles it with g++
(C++20) under AddressSanitizer + UBSan (``"address"``) or ThreadSanitizer (``"thread"``) together
with the harness runtime and driver, and returns the driver executable. Builds are cached under
``build/cuda_host/<sanitizer>/`` keyed by a hash of every input and flag.

``Driver(exe).run([Call(...), ...])`` writes each call's buffers to a temp folder, runs the driver
once for all of them (a sanitizer report fails the run), and returns each call's return code and
output tensors. Command line: ``python harness.py OP SANITIZER`` builds and prints the path.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BUILD = ROOT / "build" / "cuda_host"
_spec = importlib.util.spec_from_file_location("cuda_host_hostify", HERE / "hostify.py")
hostify = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hostify)

CXX = os.environ.get("CUDA_HOST_CXX", "g++")
FLAGS = ["-std=c++20", "-O1", "-g", "-pthread", "-Wall", "-Wno-unknown-pragmas", "-Wno-sign-compare",
         "-DCOFI_WITH_CUDA=1"]
SANITIZERS = {
    "address": ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer"],
    "thread": ["-fsanitize=thread"],
}
RUNTIME_LIB = {"address": "libasan.so", "thread": "libtsan.so"}
RUN_ENV = {
    "address": {"ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1:abort_on_error=1",
                "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1"},
    "thread": {"TSAN_OPTIONS": "halt_on_error=1:second_deadlock_stack=1"},
}


class HarnessError(RuntimeError):
    """A build or a run of the harness failed (the message holds the compiler or sanitizer output)."""


def unavailable(sanitizer: str) -> str | None:
    """Why the harness cannot be built here with ``sanitizer`` (None when it can)."""
    exe = shutil.which(CXX)
    if exe is None:
        return f"no {CXX} on PATH"
    try:
        ver = subprocess.run([exe, "-dumpversion"], capture_output=True, text=True, timeout=30).stdout.strip()
        lib = subprocess.run([exe, f"-print-file-name={RUNTIME_LIB[sanitizer]}"], capture_output=True, text=True,
                             timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"{CXX} does not run: {e}"
    if int(ver.split(".")[0] or 0) < 12:
        return f"{CXX} {ver} is older than 12 (C++20 <bit>, std::atomic_ref<float>)"
    if not os.path.isabs(lib) or not os.path.exists(lib):
        return f"{CXX} has no {sanitizer} sanitizer runtime ({RUNTIME_LIB[sanitizer]})"
    return None


def _source(op: str) -> Path:
    src = ROOT / "csrc" / op / f"{op}_cuda.cu"
    if not src.exists():
        raise HarnessError(f"no CUDA source {src.relative_to(ROOT)}")
    return src


def _key(parts: list[bytes]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little") + p)
    return h.hexdigest()


def _compile(args: list[str]) -> None:
    proc = subprocess.run(["nice", CXX, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise HarnessError(f"{CXX} {' '.join(args)}\n{proc.stderr}")


def _cached(out: Path, key: str, product: Path, make) -> Path:
    """``product`` under ``out``, rebuilt by ``make()`` unless ``out/stamp`` records ``key`` (file-locked)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamp = out / "stamp"
        if product.exists() and stamp.exists() and stamp.read_text() == key:
            return product
        stamp.unlink(missing_ok=True)
        make()
        stamp.write_text(key)
    return product


def _compile_all(jobs: list[list[str]]) -> None:
    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        list(pool.map(_compile, jobs))


def build(op: str, sanitizer: str, build_dir: Path = BUILD) -> Path:
    """The driver executable for ``op`` (csrc/<op>/<op>_cuda.cu) under ``sanitizer``, cached."""
    return build_source(_source(op), sanitizer, op, build_dir)


def build_source(src: Path, sanitizer: str, name: str, build_dir: Path = BUILD) -> Path:
    """The driver executable for the CUDA source ``src`` under ``sanitizer``, cached as ``name``."""
    if sanitizer not in SANITIZERS:
        raise HarnessError(f"sanitizer: expected one of {sorted(SANITIZERS)}, got {sanitizer!r}")
    op = name
    flags = FLAGS + SANITIZERS[sanitizer] + [f"-I{HERE / 'include'}", "-include", str(HERE / "cuda_host.h")]
    version = subprocess.run([CXX, "--version"], capture_output=True).stdout
    harness_files = [HERE / "cuda_host.h", *sorted((HERE / "include").glob("*.h"))]
    runtime = build_dir / sanitizer / "runtime"
    rt_units = [HERE / "cuda_host.cpp", HERE / "driver.cpp"]
    rt_objs = [runtime / (u.stem + ".o") for u in rt_units]
    rt_key = _key([" ".join(flags).encode(), version] + [p.read_bytes() for p in harness_files + rt_units])
    _cached(runtime, rt_key, rt_objs[-1],
            lambda: _compile_all([[*flags, "-c", str(u), "-o", str(o)] for u, o in zip(rt_units, rt_objs)]))

    out = build_dir / sanitizer / op
    inputs = [src, *sorted(src.parent.glob("*.h")), *sorted((ROOT / "csrc").glob("*.h")), HERE / "hostify.py"]
    key = _key([rt_key.encode()] + [p.read_bytes() for p in inputs])
    exe = out / "driver"

    def make() -> None:
        host_src = out / f"{op}_host.cpp"
        try:
            shown = src.relative_to(ROOT) if src.is_relative_to(ROOT) else src
            host_src.write_text(hostify.hostify(src.read_text(), str(shown)))
        except hostify.HostifyError as e:
            raise HarnessError(str(e)) from e
        obj = out / f"{op}_host.o"
        _compile([*flags, f"-I{src.parent}", "-c", str(host_src), "-o", str(obj)])
        _compile([*flags, *map(str, rt_objs), str(obj), "-o", str(exe) + ".tmp"])
        os.replace(str(exe) + ".tmp", exe)

    return _cached(out, key, exe, make)


# ------------------------------------------------------------------ calls
@dataclass
class Buf:
    """A pointer argument: a fresh allocation holding ``tensor``'s bytes (contiguous), passed as its
    address + ``offset`` elements; ``out=True`` reads the allocation back after the call."""

    tensor: object
    out: bool = False
    offset: int = 0


@dataclass
class Alias:
    """A pointer into the allocation of an earlier argument (index ``arg``), + ``offset`` elements of it."""

    arg: int
    offset: int = 0


@dataclass
class Call:
    """One launcher call: name and arguments (Buf, Alias, None, int, float)."""

    name: str
    args: list = field(default_factory=list)


@dataclass
class Result:
    rc: int
    outputs: dict  # argument index -> tensor (shape and dtype of the Buf's tensor)


def _raw(t) -> bytes:
    import torch

    t = t.detach().contiguous().cpu()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


class Driver:
    """Runs calls through one driver executable (``build``'s result) with its sanitizer's options."""

    def __init__(self, exe: Path, sanitizer: str, timeout: float = 300.0):
        self.exe, self.sanitizer, self.timeout = exe, sanitizer, timeout

    def run(self, calls: list[Call]) -> list[Result]:
        import torch

        with tempfile.TemporaryDirectory(prefix="cuda_host_") as tmp:
            tmpd = Path(tmp)
            files, reads = [], []
            for ci, call in enumerate(calls):
                lines, want = [f"call {call.name}"], {}
                for ai, a in enumerate(call.args):
                    if isinstance(a, Buf):
                        src = tmpd / f"c{ci}_a{ai}.in"
                        src.write_bytes(_raw(a.tensor))
                        dst = tmpd / f"c{ci}_a{ai}.out" if a.out else None
                        nbytes = a.tensor.numel() * a.tensor.element_size()
                        lines.append(f"ptr {nbytes} {a.offset * a.tensor.element_size()} {src} {dst or '-'}")
                        if dst is not None:
                            want[ai] = (dst, a.tensor)
                    elif isinstance(a, Alias):
                        base = call.args[a.arg]
                        lines.append(f"alias {a.arg} {a.offset * base.tensor.element_size()}")
                    elif a is None:
                        lines.append("null")
                    elif isinstance(a, bool) or not isinstance(a, (int, float)):
                        raise TypeError(f"{call.name} argument {ai}: unsupported {type(a).__name__}")
                    elif isinstance(a, int):
                        lines.append(f"int {a}")
                    else:
                        lines.append(f"float {float(a).hex()}")
                f = tmpd / f"c{ci}.call"
                f.write_text("\n".join(lines) + "\n")
                files.append(str(f))
                reads.append(want)
            env = dict(os.environ, **RUN_ENV[self.sanitizer])
            try:
                proc = subprocess.run([str(self.exe), *files], capture_output=True, text=True, env=env,
                                      timeout=self.timeout)
            except subprocess.TimeoutExpired as e:
                raise HarnessError(f"{self.exe.name} timed out after {self.timeout} s") from e
            if proc.returncode != 0:
                raise HarnessError(f"driver exited with {proc.returncode}\n{proc.stdout}\n{proc.stderr[-20000:]}")
            if proc.stderr.strip():
                raise HarnessError(f"driver wrote to stderr (a sanitizer warning?)\n{proc.stderr[-20000:]}")
            rcs = [int(line.split()[2]) for line in proc.stdout.splitlines() if line.startswith("rc ")]
            results = []
            for rc, want in zip(rcs, reads):
                outs = {}
                for ai, (dst, t) in want.items():
                    raw = bytearray(dst.read_bytes())
                    flat = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
                    outs[ai] = flat.view(t.dtype).reshape(t.shape).clone()
                results.append(Result(rc, outs))
            return results


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: harness.py OP address|thread", file=sys.stderr)
        return 2
    why = unavailable(argv[1]) if argv[1] in SANITIZERS else None
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 1
    try:
        print(build(argv[0], argv[1]))
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
