"""End-to-end training runs on CPU: torchrun + gloo, loss falling, kill-and-resume, NaN stop, wandb offline.

Distributed runs are real ``torchrun -m train`` subprocesses (2 gloo ranks) with a timeout, so a hang fails.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from train.metrics import read_metrics  # noqa: E402

FAST = [
    "trainer=quick",
    "trainer.device=cpu",  # CPU tests stay on the CPU (gloo, fp32) on a machine with GPUs too
    "model.attn_backend=reference",
    "optim.warmup_steps=2",
    "logger.progress_bar=false",
    "logger.plot=false",
    "trainer.dist_timeout_s=120",
]


def torchrun(run_dir: Path, nproc: int, *overrides: str, timeout: int = 240, wait: bool = True):
    """``torchrun -m train`` with the fast test overrides; returns the finished process (or the Popen)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FLEXDIST_RUN_DIR": str(run_dir)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd += ["-m", "train", *FAST, *overrides]
    if not wait:
        return subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def losses(run_dir: Path) -> list[float]:
    try:
        return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl")]
    except ValueError:  # a line being written right now
        return []


def ckpt_steps(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


CP2 = ["parallel=cp", "parallel.cp=2"]


@pytest.mark.distributed
def test_cp2_run_loss_falls_matches_cp1_and_kill_and_resume_continues_the_same_curve(
    tmp_path, monkeypatch
) -> None:
    """2 gloo ranks, cp = 2, 10 steps: the loss falls; the first steps equal a single-process cp = 1 run (loss
    and gradient norm); a run killed mid-way (SIGTERM to torchrun) and resumed gives identical per-step losses."""
    full, split = tmp_path / "full", tmp_path / "split"
    proc = torchrun(full, 2, *CP2, "trainer.steps=10", "trainer.ckpt_interval=5", "logger.plot=true")
    assert "world 2 = dp 1 × cp 2" in proc.stdout
    ref = read_metrics(full / "metrics.jsonl")
    assert [r["step"] for r in ref] == list(range(1, 11))
    assert ref[-1]["loss"] < ref[0]["loss"] - 1.0, f"loss did not fall: {[r['loss'] for r in ref]}"
    assert (full / "loss_curve.png").stat().st_size > 0
    assert ckpt_steps(full) == ["step_00000005", "step_00000010"]
    assert (full / ".hydra" / "config.yaml").is_file()  # rank 0 wrote Hydra's files into the run dir

    # cp = 1 on one process, same schedule (steps=10), stopped after 3 steps
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    _run_in_process(_compose(tmp_path / "cp1", "trainer.steps=10", "trainer.stop_at=3"))
    for ra, rb in zip(read_metrics(tmp_path / "cp1" / "metrics.jsonl"), ref[:3], strict=True):
        assert abs(ra["loss"] - rb["loss"]) < 1e-5 * ra["loss"], (ra, rb)
        assert abs(ra["grad_norm"] - rb["grad_norm"]) < 1e-4 * max(1.0, ra["grad_norm"]), (ra, rb)

    # kill: SIGTERM to torchrun once 2 steps are logged; the ranks agree, checkpoint that step and exit
    proc = torchrun(split, 2, *CP2, "trainer.steps=10", "trainer.ckpt_interval=0", wait=False)
    deadline = time.monotonic() + 240
    while len(losses(split)) < 2:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no training step within 240 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    (killed_at,) = [int(p.split("_")[1]) for p in ckpt_steps(split)]
    assert 2 <= killed_at < 10, (killed_at, out[-2000:], err[-2000:])
    assert "stopping on a signal" in out
    # a crash mid-save of a later step leaves only incomplete directories: never resumed from
    (split / "checkpoints" / "step_00000009.tmp").mkdir()
    (split / "checkpoints" / "step_00000009.tmp" / "trainer_state.pt").write_bytes(b"partial")
    (split / "checkpoints" / "step_00000009").mkdir()  # no COMPLETE marker
    resumed = torchrun(split, 2, *CP2, "trainer.steps=10")
    assert f"resumed from step_{killed_at:08d}" in resumed.stdout
    got = losses(split)
    assert [r["step"] for r in read_metrics(split / "metrics.jsonl")] == list(range(1, 11))
    for step, (a, b) in enumerate(zip([r["loss"] for r in ref], got, strict=True), 1):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), f"step {step}: uninterrupted {a} vs resumed {b}"
    assert "step_00000009.tmp" not in ckpt_steps(split)  # cleaned up by the next save


@pytest.mark.distributed
def test_same_global_batch_same_losses_whatever_dp_micro_batch_and_grad_accum(tmp_path, monkeypatch) -> None:
    """The loss is normalised by the global number of valid tokens, so dp=2 × micro_batch=1 (2 ranks, FSDP2),
    dp=1 × micro_batch=2 and dp=1 × grad_accum=2 (the same windows each step) give the same losses."""
    torchrun(tmp_path / "dp2", 2, "trainer.steps=10", "trainer.stop_at=3")
    ref = losses(tmp_path / "dp2")
    assert len(ref) == 3
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    for name, over in (("mb2", "trainer.micro_batch=2"), ("ga2", "trainer.grad_accum=2")):
        _run_in_process(_compose(tmp_path / name, over, "trainer.steps=10", "trainer.stop_at=3"))
        got = losses(tmp_path / name)
        assert len(got) == 3
        for a, b in zip(ref, got, strict=True):
            assert abs(a - b) <= 2e-5 * abs(a), (name, ref, got)


def _compose(run_dir: Path, *overrides: str):
    from hydra import compose, initialize_config_dir

    from train.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("config", overrides=[*FAST, f"trainer.run_dir={run_dir}", *overrides])


def _run_in_process(cfg):
    import torch.distributed as dist

    from train.trainer import run

    try:
        return run(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch) -> None:
    import torch.nn.functional as F

    import train.trainer as trainer

    calls = {"n": 0}

    class PoisonedF:
        def __getattr__(self, name):
            return getattr(F, name)

        def cross_entropy(self, *args, **kwargs):
            calls["n"] += 1
            out = F.cross_entropy(*args, **kwargs)
            return out * float("nan") if calls["n"] == 3 else out

    monkeypatch.setattr(trainer, "F", PoisonedF())
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    cfg = _compose(tmp_path, "trainer.steps=4", "trainer.ckpt_interval=2", "trainer.seq_len=256")
    with pytest.raises(
        trainer.NonFiniteLossError, match=r"loss is nan at step 3 .*checkpoints.step_00000002"
    ):
        _run_in_process(cfg)
    assert ckpt_steps(tmp_path) == ["step_00000002"]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


def test_wandb_offline_keeps_one_run_id_across_resume(tmp_path, monkeypatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    over = ["logger=wandb", "logger.wandb_mode=offline", "logger.progress_bar=false", "logger.plot=false"]
    _run_in_process(_compose(tmp_path, *over, "trainer.steps=1", "trainer.seq_len=256"))
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    _run_in_process(_compose(tmp_path, *over, "trainer.steps=2", "trainer.seq_len=256"))
    assert (tmp_path / "wandb_run_id").read_text().strip() == run_id
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert runs and all(p.name.endswith(run_id) for p in runs)


@pytest.mark.gpu
def test_gpu_bf16_run_with_the_triton_kernel(tmp_path) -> None:
    """On CUDA: bf16 FSDP2 run with the Triton kernel (cp over 2 GPUs when there are 2), loss falls."""
    import torch

    n = min(torch.cuda.device_count(), 2)
    env_over = [
        "model.attn_backend=auto",
        "trainer.device=cuda",
        "trainer.dtype=bf16",
        "trainer.seq_len=4096",
        "trainer.steps=30",
        "trainer.stop_at=null",
        "optim.warmup_steps=5",
        "parallel=cp",
        f"parallel.cp={n}",
    ]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"]
    cmd += ["-m", "train", *FAST, *env_over]
    env.update(
        {"FLEXDIST_RUN_DIR": str(tmp_path), "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
    )
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert len(recs) == 30
    first, last = sum(r["loss"] for r in recs[:3]) / 3, sum(r["loss"] for r in recs[-3:]) / 3
    assert last < first - 1.0, [r["loss"] for r in recs]


def test_every_data_source_trains_on_the_same_corpus_identically(tmp_path, monkeypatch) -> None:
    """The first 30 stdlib files as the stdlib source, a text folder, a JSONL file and a .npy token file:
    the same documents in the same order, so the same first-step loss and gradient norm."""
    import json

    import numpy as np

    from flexdist.data import StdlibSource

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    src = StdlibSource(max_docs=30)
    texts = [src.paths[i].read_bytes() for i in range(len(src))]
    (tmp_path / "txt").mkdir()
    for i, t in enumerate(texts):
        (tmp_path / "txt" / f"{i:04d}.txt").write_bytes(t)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": t.decode("utf-8")}) + "\n" for t in texts))
    np.save(tmp_path / "tok.npy", np.concatenate([src.tokens(i) for i in range(len(src))]))
    sources = {
        "stdlib": ["data=stdlib", "data.max_docs=30"],
        "text": ["data=text", f"data.path={tmp_path / 'txt'}"],
        "jsonl": ["data=jsonl", f"data.path={tmp_path / 'c.jsonl'}"],
        "tokens": [
            "data=tokens",
            f"data.path={tmp_path / 'tok.npy'}",
            "data.eod_token=256",
            "data.vocab_size=258",
        ],
    }
    results = {}
    for name, over in sources.items():
        _run_in_process(_compose(tmp_path / f"run_{name}", *over, "trainer.steps=1", "trainer.seq_len=256"))
        (rec,) = read_metrics(tmp_path / f"run_{name}" / "metrics.jsonl")
        results[name] = (rec["loss"], rec["grad_norm"])
    assert len(set(results.values())) == 1, results
