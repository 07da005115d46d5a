"""Run a script in a fresh interpreter where cofi cannot be imported (the "anyone can load it" tests).

``-I`` drops PYTHONPATH, the user site and the cwd from sys.path; the script's first lines block
``import cofi`` and exit if it still succeeds. The script gets the folders as JSON in ``sys.argv[1]``
and prints one JSON object as its last stdout line.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

BLOCK_COFI = textwrap.dedent("""
    import sys
    sys.modules["cofi"] = None  # `import cofi` raises ImportError from here on
    try:
        import cofi  # noqa: F401
        sys.exit("cofi is importable")
    except ImportError:
        pass
""")


def run_without_cofi(body: str, folders: dict[str, str], tmp_path: Path) -> dict:
    """Run ``BLOCK_COFI + body`` on ``folders`` offline; its last stdout line parsed as JSON."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1")
    r = subprocess.run([sys.executable, "-I", "-c", BLOCK_COFI + textwrap.dedent(body), json.dumps(folders)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])
