"""Rewrite a torch-free CUDA source (.cu) into host C++ for the harness in tools/cuda_host/.

Three rewrites, each keeping the line count so compiler and sanitizer reports point at the .cu:

* ``kernel<<<grid, block, smem, stream>>>(args)`` becomes
  ``::cuda_host::Launch(grid, block, smem, stream)(kernel, args)``;
* ``__shared__ T a[..], b[..];`` becomes ``static T a[..], b[..];`` followed (same line) by
  ``::cuda_host::shared_mark`` calls that poison each variable once per block;
  ``extern __shared__ T name[];`` becomes ``T* name = ::cuda_host::dynamic_shared<T*>();``;
* every ``extern "C"`` launcher (a function named ``cofi_*`` returning ``int`` or ``cudaError_t``)
  is registered by name, so the driver can call it.

Usage: ``python hostify.py IN.cu OUT.cpp``.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

_SHARED = re.compile(r"(?<!extern )\b__shared__\s+([^;]+);")
_EXTERN_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:__align__\s*\(\s*\d+\s*\)\s+)?([\w:<>\s]+?)\s+(?:__align__\s*\(\s*\d+\s*\)\s+)?(\w+)\s*\[\s*\]\s*;"
)
_LAUNCHER = re.compile(r"^\s*(?:extern\s+\"C\"\s+)?(?:int|cudaError_t)\s+(cofi_\w+)\s*\(", re.MULTILINE)


class HostifyError(ValueError):
    """The source uses a construct this rewrite does not handle."""


def _matching_back(text: str, close: int, open_ch: str, close_ch: str) -> int:
    """Index of the bracket opening the one at ``close`` (scanning backwards)."""
    depth = 0
    for i in range(close, -1, -1):
        if text[i] == close_ch:
            depth += 1
        elif text[i] == open_ch:
            depth -= 1
            if depth == 0:
                return i
    raise HostifyError(f"unbalanced {open_ch}{close_ch} before offset {close}")


def _rewrite_launches(src: str) -> str:
    out: list[str] = []
    pos = 0
    while (start := src.find("<<<", pos)) >= 0:
        end = src.find(">>>", start)
        if end < 0:
            raise HostifyError(f"'<<<' without '>>>' at offset {start}")
        # The kernel expression before <<<: an identifier (with ::) and optional template arguments.
        k = start
        while k > 0 and src[k - 1].isspace():
            k -= 1
        if src[k - 1] == ">":
            k = _matching_back(src, k - 1, "<", ">")
        m = re.search(r"[\w:]+\s*$", src[:k])
        if m is None:
            raise HostifyError(f"no kernel name before '<<<' at offset {start}")
        kernel = src[m.start():start].strip()
        config = src[start + 3:end]
        paren = end + 3
        while paren < len(src) and src[paren].isspace():
            paren += 1
        if paren >= len(src) or src[paren] != "(":
            raise HostifyError(f"'>>>' not followed by '(' at offset {end}")
        rest = paren + 1
        while rest < len(src) and src[rest].isspace():
            rest += 1
        sep = "" if src[rest] == ")" else ", "
        newlines = src[m.start():paren].count("\n")
        out.append(src[pos:m.start()])
        out.append(f"::cuda_host::Launch({config.replace(chr(10), ' ')})({kernel}{sep}" + "\n" * newlines)
        pos = paren + 1
    out.append(src[pos:])
    return "".join(out)


def _split_declarators(decl: str) -> tuple[str, list[str]]:
    """('float', ['ls[kTile]', 'ds_[kTile]']) for 'float ls[kTile], ds_[kTile]'."""
    parts, depth, cur = [], 0, ""
    for ch in decl:
        if ch in "[(<":
            depth += 1
        elif ch in "])>":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    parts.append(cur.strip())
    m = re.match(r"(.*?)(\w+\s*(?:\[[^\]]*\]\s*)*)$", parts[0], re.DOTALL)
    if m is None or not m.group(1).strip():
        raise HostifyError(f"cannot parse the __shared__ declaration {decl!r}")
    return m.group(1).strip(), [m.group(2).strip()] + parts[1:]


def _rewrite_shared(src: str) -> str:
    def dyn(m: re.Match) -> str:
        t, name = m.group(1).strip(), m.group(2)
        return f"{t}* {name} = ::cuda_host::dynamic_shared<{t}*>();" + "\n" * m.group(0).count("\n")

    src = _EXTERN_SHARED.sub(dyn, src)
    if re.search(r"extern\s+__shared__", src):
        raise HostifyError("an extern __shared__ declaration this rewrite does not recognise")

    def static(m: re.Match) -> str:
        base, decls = _split_declarators(m.group(1))
        names = [re.match(r"\w+", d).group(0) for d in decls]
        marks = " ".join(f"::cuda_host::shared_mark(&{n}, sizeof({n}));" for n in names)
        return f"static {base} {', '.join(decls)}; {marks}" + "\n" * m.group(0).count("\n")

    return _SHARED.sub(static, src)


def hostify(src: str, filename: str) -> str:
    """Host C++ for the CUDA source text ``src`` (``filename`` is used in #line directives)."""
    body = _rewrite_shared(_rewrite_launches(src))
    names = sorted(set(_LAUNCHER.findall(src)))
    if not names:
        raise HostifyError(f"{filename}: no extern \"C\" launcher named cofi_* found")
    regs = "\n".join(f"static ::cuda_host::Registrar cuda_host_reg_{n}(\"{n}\", &{n});" for n in names)
    return f'#line 1 "{filename}"\n{body}\n#line 1 "cuda_host registrations"\n{regs}\n'


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: hostify.py IN.cu OUT.cpp", file=sys.stderr)
        return 2
    src, dst = Path(argv[0]), Path(argv[1])
    try:
        text = hostify(src.read_text(), str(src))
    except HostifyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    dst.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
