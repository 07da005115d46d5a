"""Build of cofi and its extension cofi._C.

C++ CPU kernels are always built. CUDA kernels are built when torch is a CUDA build and a CUDA
toolchain is found (CUDA_HOME), or when forced with COFI_CUDA=1; COFI_CUDA=0 forces a CPU-only
build. TORCH_CUDA_ARCH_LIST is honoured; unset, it is the visible GPUs' architectures, or without a
visible GPU sm_80/86/89/90 + PTX (``PORTABLE_ARCHS``). DEBUG=1 builds without optimisation; MAX_JOBS caps ninja.
Install with `pip install --no-build-isolation .` so the build uses the torch already installed.
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
from pathlib import Path

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = Path(__file__).parent.resolve()
VERSION = "0.1.0"


def _want_cuda() -> bool:
    flag = os.environ.get("COFI_CUDA", os.environ.get("FORCE_CUDA"))
    if flag == "0":
        return False
    capable = torch.version.cuda is not None and CUDA_HOME is not None
    if flag == "1" and not capable:
        raise RuntimeError(
            f"COFI_CUDA=1 but torch {torch.__version__} (CUDA {torch.version.cuda}) with CUDA_HOME={CUDA_HOME} cannot build CUDA kernels"
        )
    return capable


def _git_sha() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def _cuda_library_includes() -> list[str]:
    """ATen's CUDA headers include cuSPARSE/cuBLAS headers; a bare nvcc toolkit may lack them while the
    CUDA torch wheel ships them under site-packages/nvidia/*/include."""
    if CUDA_HOME and (Path(CUDA_HOME) / "include" / "cusparse.h").exists():
        return []
    import site

    found = []
    for sp in site.getsitepackages():
        for inc in sorted(glob.glob(os.path.join(sp, "nvidia", "*", "include"))):
            if os.path.exists(os.path.join(inc, "cusparse.h")):
                found.append(inc)
    return found


# Without a visible GPU: Ampere (A100, A10), Ada (L4, L40), Hopper, and PTX for newer GPUs to JIT.
PORTABLE_ARCHS = "8.0;8.6;8.9;9.0+PTX"


def _default_arch_list() -> str:
    """The visible GPUs' own architectures; without one, PORTABLE_ARCHS (never a single arch, so a
    wheel built on a GPU-less machine still runs on an A100 or an L4)."""
    try:
        n = torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - a broken driver is "no GPU visible"
        n = 0
    if n == 0:
        return PORTABLE_ARCHS
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(n)})
    return ";".join(f"{a}.{b}" for a, b in caps)


def _glue_unit(path: str) -> str:
    """<op>_cuda.cu and its glue <op>_cuda.cpp would both compile to <op>_cuda.o; the glue is built
    through a one-line generated unit with a distinct name (its own includes resolve as usual)."""
    gen = ROOT / "build" / "glue" / (Path(path).stem + "_glue.cpp")
    gen.parent.mkdir(parents=True, exist_ok=True)
    text = f'#include "{(ROOT / path).as_posix()}"\n'
    if not gen.exists() or gen.read_text() != text:
        gen.write_text(text)
    return os.path.relpath(gen, ROOT)


def _extension():
    with_cuda = _want_cuda()
    debug = os.environ.get("DEBUG") == "1"
    sources = ["csrc/cofi.cpp"] + sorted(glob.glob("csrc/*/*_cpu.cpp") + glob.glob("csrc/*/*_composite.cpp"))
    cxx = ["-O0", "-g"] if debug else ["-O3", "-march=x86-64-v2" if os.uname().machine == "x86_64" else "-O3"]
    # -fno-trapping-math: lets GCC if-convert the float kernels' compare/select loops (vectorise them);
    # nothing here relies on floating-point exception flags.
    cxx += ["-fopenmp", "-fno-trapping-math"]  # the C++ standard is torch's own choice (C++17 for 2.13, C++20 for 2.14)
    extra = {"cxx": cxx}
    macros = []
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _default_arch_list())
        sources += sorted(glob.glob("csrc/*/*_cuda.cu")) + [_glue_unit(p) for p in sorted(glob.glob("csrc/*/*_cuda.cpp"))]
        extra["nvcc"] = (["-O0", "-g", "-G"] if debug else ["-O3"]) + ["--use_fast_math"]
        macros.append(("COFI_WITH_CUDA", "1"))
        ext = CUDAExtension("cofi._C", sources, extra_compile_args=extra, define_macros=macros,
                            include_dirs=_cuda_library_includes(), extra_link_args=["-fopenmp"])
    else:
        ext = CppExtension("cofi._C", sources, extra_compile_args=extra, define_macros=macros,
                           extra_link_args=["-fopenmp"])
    info = {
        "cofi": VERSION,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_compiled": with_cuda,
        "cuda_home": CUDA_HOME if with_cuda else None,
        "arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None,
        "debug": debug,
        "git_sha": _git_sha(),
    }
    (ROOT / "python" / "cofi" / "_build_info.json").write_text(json.dumps(info, indent=1) + "\n")
    return ext


setup(
    name="cofi",
    version=VERSION,
    description="Fused kernels and the CoFi structured-pruning system for transformer encoders",
    package_dir={"cofi": "python/cofi", "cofi_kernels": "cofi_kernels"},
    packages=["cofi_kernels"] + find_packages("python", include=["cofi", "cofi.*"]),
    package_data={"cofi": ["_build_info.json", "py.typed"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.10",
    install_requires=["torch>=2.13", "transformers", "datasets", "safetensors", "tqdm", "numpy", "scipy", "matplotlib", "pyyaml"],
    extras_require={"triton": ["triton"], "test": ["pytest", "hypothesis", "onnx", "onnxruntime", "onnxscript"]},
    entry_points={"console_scripts": ["cofi=cofi.cli:main"]},
)
