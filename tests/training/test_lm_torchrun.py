"""``cofi prune-lm`` under a real ``torchrun --standalone --nproc_per_node=2`` (gloo, CPU): data
parallel and FSDP2 (``--fsdp``) against one process with the same global batch, on a tiny random
GQA Llama with a tied head; each of them resuming the single-process run's checkpoint, and one
process resuming the FSDP run's (checkpoints hold full state dicts in the single-process layout).

What must be equal, and how closely:
- the ranks of the data-parallel run: bitwise (the final student weights; they apply the same
  averaged gradient);
- two processes vs one: the kept units of every delivered mask and the compact model's shape
  exactly; logged losses of every step, log_alpha, mask values, compact weights and logits up to
  float32 summation order (each rank's mean over its half batch, averaged by all-reduce or FSDP2's
  reduce-scatter, vs one mean over the whole batch): RTOL 1e-4 relative (measured <= 1e-5 here);
- a run resumed in another layout (1 process <-> DP / FSDP): the same tolerance against the
  uninterrupted single-process run.

Run as a script (``torchrun ... test_lm_torchrun.py ARGS [:: ARGS ...]``) this file is what every
rank runs: ``cofi prune-lm ARGS`` for each argument list in turn (one launch, one process group),
each followed by the rank's final student weights in ``rank<r>.safetensors``.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_llama import WORDS, save_tiny_llama

REPO = Path(__file__).resolve().parents[2]
RTOL = 1e-4
RUN = {"seq_len": 16, "batch_size": 4, "max_steps": 6, "lagrangian_warmup_steps": 4, "learning_rate": 3e-3,
       "reg_learning_rate": 0.1, "kl_weight": 1.0, "ce_weight": 1.0, "hidden_weight": 0.1, "eval_steps": 3,
       "eval_batches": 1, "save_steps": 3, "loss_chunk": 24, "num_threads": 1, "target_sparsity": 0.5,
       "adam_eps": 1e-3}  # eps well above rounding noise: Adam does not amplify summation-order differences
ONE = {**RUN, "reg_learning_rate_adapt": False}  # the one-process runs: the rate given, as on the command line


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny random Llama folder (GQA 8 heads / 2 groups, tied head, word-level tokenizer) and text."""
    d = tmp_path_factory.mktemp("tiny_llama_dist")
    save_tiny_llama(d, hidden=32, heads=4, kv_heads=2, intermediate=48, max_positions=32)
    rng = random.Random(0)
    text = d / "text.txt"
    text.write_text("\n".join(" ".join(WORDS[s:s + 5]) for s in (rng.randrange(25) for _ in range(120))))
    return d, text


def _args(tiny, out: Path) -> list[str]:
    model, text = tiny
    args = ["--model", str(model), "--train-text", str(text), "--output-dir", str(out)]
    for k, v in RUN.items():
        args += ["--" + k.replace("_", "-"), str(v)]
    return args


def _torchrun(args: list[str]) -> None:
    exe = Path(sys.executable).with_name("torchrun")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(REPO / "python"), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run(cmd + ["--standalone", "--nproc_per_node=2", str(Path(__file__).resolve()), *args], env=env,
                       capture_output=True, text=True, timeout=240, check=False)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]


def _main(argv: list[str]) -> int:
    """One rank: ``cofi prune-lm`` with each ``::``-separated argument list, then its final student
    weights in rank<r>.safetensors."""
    import argparse

    from cofi.training.cli_prune_lm import add_arguments, config_from_args
    from cofi.training.lm_prune import LMPruner
    from safetensors.torch import save_file

    p = argparse.ArgumentParser()
    add_arguments(p)
    runs: list[list[str]] = [[]]
    for x in argv:
        runs.append([]) if x == "::" else runs[-1].append(x)
    for i, args in enumerate(runs):
        a = p.parse_args(args)
        cfg = config_from_args(a)
        pruner = LMPruner(cfg, resume=a.resume, fsdp=a.fsdp, log=lambda m: None)
        try:
            if a.fsdp:
                _check_sharded(pruner.student)
            pruner.run()
            if a.fsdp:  # the teacher's layers are resharded after its forwards without grad
                _check_sharded(pruner.teacher)
            sd = {k: v.detach().clone().contiguous() for k, v in pruner.student.state_dict().items()}
            save_file(sd, str(Path(cfg.output_dir) / f"rank{pruner.par.dist.rank}.safetensors"))
        finally:
            if i == len(runs) - 1:
                pruner.par.close()
    return 0


def _check_sharded(model: torch.nn.Module) -> None:
    """Every rank holds half of each decoder layer's weights (FSDP2's dim-0 shards)."""
    from torch.distributed.tensor import DTensor

    for layer in model.model.layers:
        for name, w in layer.named_parameters():
            assert isinstance(w, DTensor) and w.to_local().shape[0] == w.shape[0] // 2, name


def _records(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    a, b = a.double(), b.double()
    assert (a - b).norm() <= RTOL * max(float(b.norm()), 1e-3), (what, float((a - b).norm()), float(b.norm()))


def _log_alpha(out: Path) -> torch.Tensor:
    last = max((out / "checkpoints").glob("ckpt-*.pt"))
    return torch.load(last, weights_only=True)["maskset"]["log_alpha"]


def _same_run(got: Path, ref: Path) -> None:
    """``got`` equals the single-process ``ref`` up to summation order (module docstring)."""
    ra, rb = _records(got), _records(ref)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == list(range(1, RUN["max_steps"] + 1))
    for a, b in zip(ra, rb):
        assert a.keys() == b.keys()
        for k, v in a.items():
            if isinstance(v, float):
                assert abs(v - b[k]) <= RTOL * max(abs(b[k]), 1e-3), (a["step"], k, v, b[k])
    _close(_log_alpha(got), _log_alpha(ref), "log_alpha")
    ma, mb = load_file(str(got / "masks.safetensors")), load_file(str(ref / "masks.safetensors"))
    assert ma.keys() == mb.keys()
    for k in ma:
        assert torch.equal(ma[k] != 0, mb[k] != 0), k
        _close(ma[k], mb[k], f"mask {k}")
    ca, cb = (json.loads((d / "compact" / "cofi_llama.json").read_text()) for d in (got, ref))
    assert ca == cb
    wa, wb = load_file(str(got / "compact" / "model.safetensors")), load_file(str(ref / "compact" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        _close(wa[k], wb[k], f"compact {k}")
    res_a, res_b = (json.loads((d / "results.json").read_text()) for d in (got, ref))
    assert res_a["structure"] == res_b["structure"]
    assert abs(res_a["eval_ppl_pruned"] - res_b["eval_ppl_pruned"]) <= RTOL * res_b["eval_ppl_pruned"]


def _compact_logits(out: Path) -> torch.Tensor:
    from cofi.runtime.compact_llama import CompactLlamaForCausalLM

    m = CompactLlamaForCausalLM.from_pretrained(out / "compact").eval()
    ids = torch.randint(2, len(WORDS) + 2, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return m(ids)


def _killed_at_step_4(src: Path, dst: Path) -> Path:
    """``dst``: the run in ``src`` as a kill during step 4 leaves it (step-3 checkpoint, metrics to
    step 6 that resume trims, no outputs), its saved output_dir moved to ``dst``."""
    shutil.copytree(src, dst)
    for f in sorted((dst / "checkpoints").glob("ckpt-*-00000006.pt*")) + [dst / "results.json",
                                                                           dst / "masks.safetensors"]:
        f.unlink()
    shutil.rmtree(dst / "compact")
    for f in dst.glob("rank*.safetensors"):
        f.unlink()
    cfg = dst / "prune_lm_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "output_dir": str(dst)}))
    return dst


def test_torchrun_dp_and_fsdp_match_one_process(tiny, tmp_path):
    """One launch: data parallel, FSDP2, and both resuming the single-process run's checkpoint
    (full state dicts into replicas / shards); then one process resumes the FSDP run's checkpoint."""
    from cofi.training.lm_prune import LMPruneConfig, LMPruner

    one, dp, fsdp = tmp_path / "one", tmp_path / "dp", tmp_path / "fsdp"
    model, text = tiny
    LMPruner(LMPruneConfig(model=str(model), output_dir=str(one), train_text=str(text), **ONE),
             log=lambda m: None).run()
    dp_res, fsdp_res = _killed_at_step_4(one, tmp_path / "dp_res"), _killed_at_step_4(one, tmp_path / "fsdp_res")
    _torchrun(_args(tiny, dp) + ["::"] + _args(tiny, fsdp) + ["--fsdp", "::"] + _args(tiny, dp_res) + ["--resume", "::"]
              + _args(tiny, fsdp_res) + ["--resume", "--fsdp"])

    for got in (dp, dp_res):
        r0, r1 = (load_file(str(got / f"rank{r}.safetensors")) for r in (0, 1))
        assert all(torch.equal(r0[k], r1[k]) for k in r0)
    for got in (dp, fsdp):
        _same_run(got, one)
        _close(_compact_logits(got), _compact_logits(one), f"{got.name} compact logits")
    for got in (dp_res, fsdp_res):
        _same_run(got, one)

    # one process resumes the FSDP run from its step-3 checkpoint (gathered full state dicts)
    res = _killed_at_step_4(fsdp, tmp_path / "one_res")
    LMPruner(LMPruneConfig(model=str(model), output_dir=str(res), train_text=str(text), **ONE), resume=True,
             log=lambda m: None).run()
    _same_run(res, one)


def test_fsdp_needs_torchrun(tiny, tmp_path, capsys):
    from cofi.cli import main

    rc = main(["prune-lm", *_args(tiny, tmp_path / "x"), "--fsdp"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--fsdp" in err and "WORLD_SIZE=1" in err


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
