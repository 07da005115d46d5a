"""cofi.training end to end on a tiny random BERT and a synthetic task (CPU, seconds per run).

finetune -> prune to 0.6 / 0.95 (real sparsity within 0.02 of target) -> compact fine-tuning;
SIGKILL + --resume is bitwise equal to an uninterrupted run; a corrupted checkpoint falls back to
the previous good one; config errors are clear; 2-process gloo DDP keeps ranks identical and
matches a single-process run with the same global batch.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from _hooks import DumpRanks, KillAt, run
from _tiny import base_args

REPO = Path(__file__).resolve().parents[2]
PRUNE = dict(learning_rate=1e-3, reg_learning_rate=0.1, batch_size=16, eval_steps=20, logging_steps=10,
             prepruning_steps=16, sparsity_epsilon=0.02)


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []) + [str(REPO / "python"), str(REPO)])
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    return env


def _prune_args(tiny, out, **kw):
    opts = {**PRUNE, **kw}
    return ["prune"] + base_args(tiny["model"], tiny["train"], tiny["dev"], out, teacher=tiny["teacher"], **opts)


def _read_jsonl(p: Path) -> list[dict]:
    recs = [json.loads(line) for line in p.read_text().splitlines()]
    for r in recs:
        r.pop("steps_per_s", None)
    return recs


def _weights(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(d / "model.safetensors"))


class TestEndToEnd:
    def test_teacher_learned(self, tiny):
        res = json.loads((tiny["teacher"].parent / "results.json").read_text())
        assert res["best_metric"] >= 0.9

    @pytest.mark.parametrize("target", [0.6, 0.95])
    def test_prune_to_target(self, tiny, target):
        from cofi.cli import main

        out = tiny["root"] / f"prune{target}"
        rc = main(_prune_args(tiny, out, target_sparsity=target, max_steps=240, lagrangian_warmup_steps=120,
                              compact_max_steps=10, compact_batch_size=16, compact_learning_rate=1e-3))
        assert rc == 0
        best = out / "best"
        for f in ("model.safetensors", "config.json", "masks.safetensors", "mask_params.safetensors",
                  "layer_transformation.safetensors", "metrics.json"):
            assert (best / f).exists(), f
        m = json.loads((best / "metrics.json").read_text())
        assert abs(m["real_sparsity"] - target) <= 0.02, m
        recs = _read_jsonl(out / "metrics.jsonl")
        train = [r for r in recs if r.get("phase") == "pruning"]
        assert train and all(k in train[-1] for k in ("expected_sparsity", "lambda_1", "lambda_2", "target_sparsity"))
        assert train[-1]["target_sparsity"] == pytest.approx(target)
        # stage 2: compact model exists, loads, and its sparsity matches the masks' structure
        from cofi.runtime import CompactModel

        cm = CompactModel.from_pretrained(str(out / "compact"))
        assert abs(cm.sparsity() - target) <= 0.05
        res = json.loads((out / "results.json").read_text())
        assert res["compact"]["steps"] == 10

    def test_dense_mode_runs(self, tiny):
        from cofi.cli import main

        out = tiny["root"] / "dense"
        rc = main(_prune_args(tiny, out, target_sparsity=0.5, max_steps=30, lagrangian_warmup_steps=10, backend="dense",
                              layer_distill="v4", ce_alpha=0.1, skip_compact="true"))
        assert rc == 0 and (out / "final" / "masks.safetensors").exists()


def _forked(target, *args) -> int:
    """Run target(*args) in a forked child (inherits the imports: no 10 s interpreter start); exit code."""
    import multiprocessing as mp

    p = mp.get_context("fork").Process(target=target, args=args)
    p.start()
    p.join(240)
    return p.exitcode


def _kill_child(args, step):
    stage, at = step.split(":")
    sys.exit(run(args, [KillAt(stage, int(at))]))


def _ddp_child(rank, world, port, args, callbacks=None):
    """One of ``world`` data-parallel processes (env://, as torchrun starts them); every rank dumps
    its final weights (DumpRanks) unless other ``callbacks`` are given."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    rc = run(args, [DumpRanks()] if callbacks is None else callbacks)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(rc)


class TestResume:
    def test_sigkill_resume_is_bitwise_equal(self, tiny):
        from cofi.cli import main

        kw = dict(target_sparsity=0.3, max_steps=60, lagrangian_warmup_steps=20, reg_learning_rate=0.2, save_steps=15, eval_steps=10,
                  compact_max_steps=8, compact_batch_size=16, dropout=0.1)
        ref = tiny["root"] / "uninterrupted"
        assert main(_prune_args(tiny, ref, **kw)) == 0
        out = tiny["root"] / "killed"
        kill_step = int(torch.randint(31, 44, (1,), generator=torch.Generator().manual_seed(os.getpid())))
        assert _forked(_kill_child, _prune_args(tiny, out, **kw), f"prune:{kill_step}") == -9  # SIGKILL
        assert not (out / "final").exists()

        assert main(_prune_args(tiny, out, **kw) + ["--resume"]) == 0
        assert (ref / "best").exists() == (out / "best").exists()
        for sub in ("final", "best", "compact"):
            if not (ref / sub).exists():
                continue
            a = _weights(ref / sub)
            b = _weights(out / sub)
            assert a.keys() == b.keys()
            for k in a:
                assert torch.equal(a[k], b[k]), (sub, k)
        for f in ("masks.safetensors", "mask_params.safetensors"):
            from safetensors.torch import load_file

            a, b = load_file(str(ref / "final" / f)), load_file(str(out / "final" / f))
            assert all(torch.equal(a[k], b[k]) for k in a)
        assert _read_jsonl(ref / "metrics.jsonl") == _read_jsonl(out / "metrics.jsonl")

    def test_corrupted_checkpoint_falls_back(self, tiny, capsys):
        from cofi.cli import main
        from cofi.training import checkpoint as C

        kw = dict(target_sparsity=0.5, max_steps=30, lagrangian_warmup_steps=10, save_steps=10, keep_checkpoints=3,
                  skip_compact="true")
        ref = tiny["root"] / "corrupt_ref"
        assert main(_prune_args(tiny, ref, **kw)) == 0
        ck = C.list_checkpoints(ref / "checkpoints")
        assert len(ck) == 3
        # truncate the newest and flip a byte in the middle one: both must be skipped, with a message
        data = ck[-1].read_bytes()
        ck[-1].write_bytes(data[: len(data) // 2])
        mid = bytearray(ck[-2].read_bytes())
        mid[len(mid) // 2] ^= 0xFF
        ck[-2].write_bytes(bytes(mid))
        with pytest.warns(RuntimeWarning, match="corrupted"):
            path, state = C.load_latest(ref / "checkpoints", log=lambda m: None)
        assert path == ck[0] and state["loop"]["step"] == 10
        # --resume from the damaged folder redoes steps 11..30 and ends with the same weights
        before = _weights(ref / "final")
        with pytest.warns(RuntimeWarning):
            assert main(_prune_args(tiny, ref, **kw) + ["--resume"]) == 0
        after = _weights(ref / "final")
        assert all(torch.equal(before[k], after[k]) for k in before)


class TestConfig:
    @pytest.mark.parametrize("extra,match", [
        (["--target-sparsity", "1.0"], "target_sparsity must be in"),
        (["--target-sparsity", "-0.1"], "target_sparsity must be in"),
        (["--task", "nosuchtask"], "task must be one of"),
        (["--layer-distill", "v9"], "layer_distill must be one of"),
        (["--set", "learning_rat=1"], "did you mean learning_rate"),
        (["--preset", "huge"], "unknown preset"),
        (["--batch-size", "x"], "batch_size must be of type"),
    ])
    def test_bad_values(self, tiny, extra, match, capsys):
        from cofi.cli import main

        args = _prune_args(tiny, tiny["root"] / "bad", max_steps=5) + extra
        try:
            rc = main(args)
        except SystemExit as e:  # argparse type errors
            rc = e.code
        err = capsys.readouterr().err
        assert rc == 2 and match in err, err

    def test_missing_files_and_vocab_mismatch(self, tiny, tmp_path, capsys):
        from cofi.cli import main
        from _tiny import make_tiny_model

        rc = main(["prune"] + base_args(tiny["model"], tmp_path / "nope.csv", tiny["dev"], tmp_path / "o",
                                        teacher=tiny["teacher"], max_steps=5))
        assert rc == 2 and "file not found" in capsys.readouterr().err
        rc = main(_prune_args(tiny, tmp_path / "o", max_steps=5) + ["--teacher", str(tmp_path / "noteacher")])
        assert rc == 2 and "noteacher" in capsys.readouterr().err
        other = make_tiny_model(tmp_path / "big_vocab", hidden=32)
        cfgp = other / "config.json"
        c = json.loads(cfgp.read_text())
        c["vocab_size"] += 7
        cfgp.write_text(json.dumps(c))
        from transformers import BertForSequenceClassification, BertConfig

        BertForSequenceClassification(BertConfig(**{k: v for k, v in c.items() if k not in ("architectures",)})).save_pretrained(str(other))
        rc = main(_prune_args(tiny, tmp_path / "o", max_steps=5) + ["--teacher", str(other)])
        assert rc == 2 and "vocab mismatch" in capsys.readouterr().err

    def test_yaml_roundtrip_and_precedence(self, tmp_path):
        import argparse

        from cofi.training.config import TrainConfig
        from cofi.training.config_cli import add_config_arguments, resolve

        y = tmp_path / "c.yaml"
        y.write_text("model: m\nteacher: t\nlearning_rate: 3.0e-5\nepochs: 2\n")
        p = argparse.ArgumentParser()
        add_config_arguments(p)
        cfg = resolve(p.parse_args(["--preset", "glue-small", "--config", str(y), "--epochs", "3",
                                    "--set", "reg_learning_rate=0.5"]), "prune")
        assert (cfg.learning_rate, cfg.epochs, cfg.reg_learning_rate, cfg.prepruning_epochs) == (3e-5, 3.0, 0.5, 4.0)
        assert cfg.freeze_embeddings is True
        cfg.save(tmp_path / "out.yaml")
        assert TrainConfig.load(tmp_path / "out.yaml") == cfg


class TestDistributed:
    def test_two_process_gloo(self, tiny):

        from _tiny import make_task

        train, dev = make_task(tiny["root"] / "fixed", n_train=128, n_eval=32, fixed_len=8)
        kw = dict(target_sparsity=0.5, max_steps=16, prepruning_steps=4, lagrangian_warmup_steps=8, eval_steps=8,
                  skip_compact="true", max_grad_norm=0.0, adam_eps=0.1)  # large eps: no sign-amplified noise
        single = tiny["root"] / "ddp1"
        args = ["prune"] + base_args(tiny["model"], train, dev, single, teacher=tiny["teacher"], **{**PRUNE, **kw})
        assert run(args, [DumpRanks()]) == 0
        two = tiny["root"] / "ddp2"
        args = ["prune"] + base_args(tiny["model"], train, dev, two, teacher=tiny["teacher"], **{**PRUNE, **kw})
        # two gloo processes, as torchrun starts them (env://), forked so they skip the imports
        import multiprocessing as mp
        import socket

        with socket.socket() as s_:
            s_.bind(("127.0.0.1", 0))
            port = s_.getsockname()[1]
        ctx = mp.get_context("fork")
        procs = [ctx.Process(target=_ddp_child, args=(r, 2, port, args)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(240)
        assert [p.exitcode for p in procs] == [0, 0]
        r0, r1, s = (torch.load(d, weights_only=True) for d in (two / "rank0.pt", two / "rank1.pt", single / "rank0.pt"))
        for part in ("model", "maskset"):
            for k in r0[part]:
                assert torch.equal(r0[part][k], r1[part][k]), (part, k)  # ranks identical
                # same global batch: equal up to float summation order (compare whole tensors)
                a, b = r0[part][k].double(), s[part][k].double()
                assert (a - b).norm() <= 1e-2 * max(b.norm(), 1e-3), (part, k, float((a - b).norm()), float(b.norm()))
