"""The training loop, top to bottom: config → process group + (dp, cp) mesh → data → model → loop → checkpoints.

Launch (from the repository root; every rank runs this same file):

    python -m train                                        # one process (CPU or one GPU)
    bash launch/quickstart.sh                              # set up .venv, then the default run
    bash launch/cpu_gloo.sh trainer.steps=100              # NPROC CPU ranks over gloo, cp = NPROC
    bash launch/torchrun_single_node.sh model=1b parallel=cp parallel.cp=8 trainer=long
    NNODES=4 NODE_RANK=0 MASTER_ADDR=host0 bash launch/torchrun_multi_node.sh model=8b parallel.cp=8
    sbatch launch/slurm.sbatch model=8b parallel.cp=8

Each step: ``grad_accum`` micro-batches of packed windows; under cp > 1 each window is split over the cp group by
the batch's CP plan (tokens, labels and positions-within-document sharded by the same permutation), and the
plans' statistics (balance, skipped ring steps, K/V bytes vs the mask's minimum, plan time) are logged as
``cp_*`` metrics. ``trainer.activation_checkpointing=selective`` recomputes blocks without their attention op.
The loss is the sum of token cross-entropies divided by the GLOBAL number of valid labels (all-reduced over every
rank and micro-batch), so the gradient is the same whatever dp, cp, micro_batch and grad_accum are.

``trainer.profile_steps=[N,...]`` writes a torch.profiler Chrome trace of those steps per rank under
``<run_dir>/profile/``.

Stopping: at ``trainer.steps``; at ``trainer.stop_at`` (same schedule, resumable); on SIGTERM / SIGUSR1 (every rank
checkpoints the current step first — torchrun forwards SIGTERM, SLURM sends it before the time limit); on a
NaN/inf loss (no update applied, last good checkpoint kept). Re-running with the same run dir resumes.
"""

from __future__ import annotations

import math
import os
import resource
import signal
import threading
import time
from collections import deque
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from flexdist.data import (
    IGNORE_INDEX,
    DocumentSource,
    JsonlSource,
    PackedLoader,
    StdlibSource,
    TextFolderSource,
    TokenFileSource,
)
from flexdist.model import (
    AttentionTimer,
    ContextParallelDocumentAttention,
    Llama,
    LlamaConfig,
    LocalDocumentAttention,
    checkpointing_mode,
    compile_model,
    document_causal_pairs,
    flops_per_token,
    make_cp_plan,
)

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import validate
from .metrics import RunLogger, cp_step_metrics

# Peak dense bf16 TFLOP/s per device, for MFU (override with trainer.peak_tflops).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "B200": 2250.0}


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf; the run stopped before applying that step."""


def _value(node: Any) -> Any:
    return node.value if hasattr(node, "value") else node


# --------------------------------------------------------------------------------------------------------------
# setup
# --------------------------------------------------------------------------------------------------------------
def init_distributed(device_kind: str, timeout_s: int) -> tuple[int, int, torch.device]:
    """Process group from torchrun's env (or a 1-rank group for a plain ``python -m train``)."""
    backend = "nccl" if device_kind == "cuda" else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if device_kind == "cuda" else torch.device("cpu")
    if device_kind == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        if "RANK" in os.environ:
            dist.init_process_group(
                backend, timeout=timeout, device_id=device if device_kind == "cuda" else None
            )
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return dist.get_rank(), dist.get_world_size(), device


def build_source(data: Any) -> DocumentSource:
    src = _value(data.source)
    if src == "stdlib":
        return StdlibSource(max_docs=data.max_docs)
    if src == "text":
        return TextFolderSource(data.path, data.pattern, max_docs=data.max_docs)
    if src == "jsonl":
        return JsonlSource(data.path, data.text_field, max_docs=data.max_docs)
    if src == "tokens":
        return TokenFileSource(
            data.path, eod_id=data.eod_token, vocab_size=data.vocab_size, dtype=data.token_dtype
        )
    raise ValueError(f"data.source={src!r} is not one of stdlib, text, jsonl, tokens")


def build_model(cfg: Any, vocab_size: int, device: torch.device) -> Llama:
    """The model, initialised identically on every rank (seeded), before sharding."""
    m = cfg.model
    lcfg = LlamaConfig(
        vocab_size=m.vocab_size or -(-vocab_size // 64) * 64,
        dim=m.dim,
        n_layers=m.n_layers,
        n_heads=m.n_heads,
        n_kv_heads=m.n_kv_heads,
        ffn_hidden_dim=m.ffn_hidden_dim,
        norm_eps=m.norm_eps,
        rope_theta=m.rope_theta,
        tie_embeddings=m.tie_embeddings,
        init_std=m.init_std,
    )
    if lcfg.vocab_size < vocab_size:
        raise ValueError(f"model.vocab_size={lcfg.vocab_size} < the data's vocabulary size {vocab_size}")
    torch.manual_seed(cfg.trainer.seed)
    with torch.device(device):
        model = Llama(lcfg)
    return model


def shard_model(model: Llama, mesh: DeviceMesh, param_dtype: torch.dtype) -> None:
    """FSDP2: each block is one all-gather / reduce-scatter unit, then the root (embeddings, norm, output)."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)


def compile_blocks(model: Llama, backend: str = "inductor") -> None:
    """``torch.compile(fullgraph=True, dynamic=False)`` each block's forward, attention op included (in place).

    The attention callable is an argument of the block's forward and changes every batch; inside compiled code
    it runs the flexdist custom ops (``flexdist::document_attention_*`` / ``flexdist::cp_attention_*``), whose
    masks / CP plan are tensor inputs, so a new batch reuses the graph. ``forward`` is replaced on the
    instance: parameter names, and so checkpoints, are unchanged, and FSDP2's hooks (applied afterwards) stay
    outside the compiled region, around it.
    """
    for layer in model.layers:
        layer.forward = torch.compile(layer.forward, fullgraph=True, dynamic=False, backend=backend)


def build_optimizer(model: torch.nn.Module, o: Any) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices except the embedding, none on norms."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "tok_embeddings" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Linear warmup over ``warmup`` steps, then cosine from 1 to ``min_ratio`` at step ``total``."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def peak_memory_gib(device: torch.device) -> float:
    """Peak device memory (CUDA allocator) or, on CPU, this process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def agree_on_run_dir(run_dir: str) -> Path:
    """Every rank must write to the same run directory (computed once by the launcher)."""
    dirs: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(dirs, str(run_dir))
    if len(set(dirs)) != 1:
        raise ValueError(
            f"ranks disagree on trainer.run_dir: {sorted(set(dirs))}; pass trainer.run_dir=... or set "
            "FLEXDIST_RUN_DIR once in the launcher (the launch/ scripts do)"
        )
    return Path(run_dir).absolute()


# --------------------------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------------------------
def run(cfg: DictConfig) -> dict[str, Any]:
    """Train as configured; returns a summary (final step and loss) on every rank."""
    # 1. validate everything that can be checked without a process group
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    res = validate(cfg, world_size)
    t = cfg.trainer
    device_kind = _value(t.device)
    if device_kind == "auto":
        device_kind = "cuda" if torch.cuda.is_available() else "cpu"
    dtype_name = _value(t.dtype)
    if dtype_name == "auto":
        dtype_name = "bf16" if device_kind == "cuda" and cfg.parallel.fsdp else "fp32"
    param_dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32

    # 2. process group, (dp, cp) mesh; FSDP shards over all dp × cp ranks (a 1-D mesh over the world)
    rank, world_size, device = init_distributed(device_kind, t.dist_timeout_s)
    mesh = init_device_mesh(device.type, (res.dp, res.cp), mesh_dim_names=("dp", "cp"))
    fsdp_mesh = (
        mesh["dp"] if res.cp == 1 else init_device_mesh(device.type, (world_size,), mesh_dim_names=("fsdp",))
    )
    dp_rank = mesh["dp"].get_local_rank()
    cp_group = mesh["cp"].get_group()
    run_dir = agree_on_run_dir(t.run_dir)
    is_main = rank == 0

    # 3. data: every rank indexes the same corpus; dp ranks read disjoint windows, cp ranks the same ones
    source = build_source(cfg.data)
    loader = PackedLoader(
        source,
        seq_len=t.seq_len,
        micro_batch=t.micro_batch,
        dp_rank=dp_rank,
        dp_size=res.dp,
        seed=t.seed,
        shuffle=cfg.data.shuffle,
    )

    # 4. model (identical init everywhere), activation checkpointing, compile, FSDP2, optimizer, schedule
    model = build_model(cfg, source.vocab_size, device)
    n_params = model.num_params()
    fpt_cfg = model.cfg
    model.activation_checkpointing = checkpointing_mode(t.activation_checkpointing)
    if t.compile:
        if t.compile_scope == "blocks":
            compile_blocks(model, backend=t.compile_backend)
        else:
            compile_model(model, backend=t.compile_backend)
    if cfg.parallel.fsdp:
        shard_model(model, fsdp_mesh, param_dtype)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.optim.warmup_steps, t.steps, cfg.optim.min_lr_ratio)
    )

    # 5. resume from the newest complete checkpoint of this run dir
    start_step = 0
    latest = latest_checkpoint(run_dir) if t.resume else None
    if latest is not None:
        state = load_checkpoint(latest[1], model, optimizer)
        scheduler.load_state_dict(state["scheduler"])
        loader.load_state_dict(state["loader"])
        start_step = int(state["step"])

    logger = RunLogger(
        run_dir,
        enabled=is_main,
        total_steps=t.steps,
        start_step=start_step,
        progress_bar=cfg.logger.progress_bar,
        wandb_cfg=_wandb_cfg(cfg),
        config=OmegaConf.to_container(cfg, resolve=True, enum_to_str=True) if is_main else None,
    )
    logger.print(
        f"flexdist train: {cfg.model.name} ({n_params / 1e6:.1f}M params) | world {world_size} = dp {res.dp} × "
        f"cp {res.cp} | {device.type} {dtype_name} | seq_len {t.seq_len} × micro_batch {t.micro_batch} × "
        f"grad_accum {t.grad_accum} × dp = {res.tokens_per_step:,} tokens/step | {len(source)} docs, "
        f"{int(source.doc_lengths.sum()):,} tokens | run dir {run_dir}"
        + (f" | resumed from {latest[1].name}" if latest else "")
    )
    peak = peak_flops(device, t.peak_tflops)
    save_every = t.ckpt_interval
    loss_val = float("nan")
    nan_steps = 0
    recent: deque[float] = deque(maxlen=10)  # the last 10 losses: their mean is less noisy than one window's
    profile_steps = set(t.profile_steps)
    step = start_step
    end = min(t.steps, t.stop_at) if t.stop_at else t.steps  # stop_at: a planned interruption (time limits)

    # 6. the loop
    model.train()
    with _StopSignals() as signals:
        while step < end:
            prof = _start_profiler(device) if step + 1 in profile_steps else None
            t0 = time.perf_counter()
            micro = [loader.next_batch() for _ in range(t.grad_accum)]
            # shard every micro-batch for this rank (cp > 1) and build its attention once, shared by all layers
            shards, pairs, plans = [], 0, []
            timer = AttentionTimer()  # this step's attention forward time (CUDA events on GPU)
            for batch in micro:
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                pairs += document_causal_pairs(batch["doc_ids"])
                if res.cp > 1:
                    plan = make_cp_plan(
                        batch["doc_ids"],
                        cp_group,
                        balance=_value(cfg.parallel.cp_balance),
                        strategy=_value(cfg.parallel.cp_strategy),
                        block_size=cfg.parallel.block_size,
                        backend=_value(cfg.model.attn_backend),
                        ring_group=cfg.parallel.cp_ring_group,
                        head_chunks=res.cp_head_chunks,  # (null in the config: the strategy's default)
                        local_first=res.cp_local_first,
                        bwd_head_chunks=res.cp_bwd_head_chunks,
                    )
                    if hasattr(plan, "comm_wait_seconds"):
                        # CUDA events around the ring's waits (exposed communication); off elsewhere
                        plan.timing = device.type == "cuda"
                    tokens, labels = plan.shard(batch["tokens"], 1), plan.shard(batch["labels"], 1)
                    positions = plan.positions.to(device)
                    attention = ContextParallelDocumentAttention(plan, timer=timer)
                    plans.append(plan)
                else:
                    tokens, labels, positions = batch["tokens"], batch["labels"], batch["positions"]
                    attention = LocalDocumentAttention(
                        batch["doc_ids"],
                        backend=_value(cfg.model.attn_backend),
                        block_size=cfg.parallel.block_size,
                        timer=timer,
                    )
                shards.append((tokens, labels, positions, attention))

            # global number of valid labels over all ranks and micro-batches: the loss denominator
            counts = torch.tensor(
                [float(sum(int((s[1] != IGNORE_INDEX).sum()) for s in shards)), 0.0], device=device
            )
            dist.all_reduce(counts)
            n_valid = counts[0].clamp_min(1.0)

            # forward / backward; FSDP averages gradients over the world, hence × world_size
            loss_sum = torch.zeros((), device=device)
            for tokens, labels, positions, attention in shards:
                logits = model(tokens, positions, attention)
                ls = F.cross_entropy(
                    logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
                )
                scale = world_size if cfg.parallel.fsdp else 1
                (ls * scale / n_valid).backward()
                loss_sum += ls.detach()
            if not cfg.parallel.fsdp:
                for p in model.parameters():
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
            dist.all_reduce(loss_sum)
            loss_val = (loss_sum / n_valid).item()
            comm_wait_s = _comm_wait_seconds(plans)

            # NaN/inf: skip the update; stop (keeping the last good checkpoint) past max_nan_steps
            if not math.isfinite(loss_val):
                nan_steps += 1
                optimizer.zero_grad(set_to_none=True)
                if nan_steps > t.max_nan_steps:
                    last = latest_checkpoint(run_dir)
                    msg = (
                        f"loss is {loss_val} at step {step + 1} (non-finite losses so far: {nan_steps}, "
                        f"trainer.max_nan_steps={t.max_nan_steps}); stopping. Last good checkpoint: "
                        f"{last[1] if last else 'none'} — lower optim.lr or raise optim.warmup_steps and resume."
                    )
                    logger.print(msg)
                    logger.close(plot=cfg.logger.plot)
                    raise NonFiniteLossError(msg)
                logger.print(f"step {step + 1}: non-finite loss {loss_val}, update skipped")
                skipped = True
            else:
                skipped = False
            if not skipped:
                clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                if isinstance(grad_norm, DTensor):
                    grad_norm = grad_norm.full_tensor()
                lr = scheduler.get_last_lr()[0]
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
            step += 1
            if not skipped:
                recent.append(loss_val)

            # metrics (rank 0), progress bar, checkpoint
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            log_now = not skipped and (step % t.log_interval == 0 or step == end)
            if is_main and log_now:
                tps = res.tokens_per_step / dt
                pairs_per_token = pairs / (len(micro) * t.micro_batch * t.seq_len)
                mfu = (
                    flops_per_token(fpt_cfg, pairs_per_token) * tps / (world_size * peak)
                    if peak
                    else float("nan")
                )
                logger.log(
                    step,
                    {
                        "loss": loss_val,
                        "loss_avg10": sum(recent) / len(recent),
                        "lr": lr,
                        "grad_norm": float(grad_norm),
                        "tokens_per_s": tps,
                        "mfu": mfu,
                        "peak_mem_gib": peak_memory_gib(device),
                        "step_time_s": dt,
                        # not measured inside compiled blocks (trainer.compile_scope=blocks): no timed calls
                        **({"attn_fwd_s": timer.total_s()} if timer.calls else {}),
                        **cp_step_metrics(
                            plans,
                            num_kv_heads=fpt_cfg.n_kv_heads,
                            head_dim=fpt_cfg.head_dim,
                            dtype_bytes=torch.finfo(param_dtype).bits // 8,
                            comm_wait_s=comm_wait_s,
                        ),
                    },
                )
            if prof is not None:
                prof.stop()
                trace = run_dir / "profile" / f"step_{step:08d}_rank{rank}.json"
                trace.parent.mkdir(parents=True, exist_ok=True)
                prof.export_chrome_trace(str(trace))
                logger.print(f"step {step}: profiler trace {trace} (and one per rank)")
            logger.advance()
            # SIGTERM / SIGUSR1 on any rank (torchrun forwards SIGTERM; SLURM sends one before the time limit):
            # every rank agrees, checkpoints this step and stops
            stop = torch.tensor([1.0 if signals.received else 0.0], device=device)
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)
            if step == end or (save_every and step % save_every == 0) or stop.item():
                trainer_state = {
                    "step": step,
                    "scheduler": scheduler.state_dict(),
                    "loader": loader.state_dict(),
                }
                path = save_checkpoint(run_dir, step, model, optimizer, trainer_state, keep_last=t.keep_last)
                logger.print(f"step {step}: checkpoint {path}")
            if stop.item():
                logger.print(f"step {step}: stopping on a signal; run again with the same run dir to resume")
                break

    logger.close(plot=cfg.logger.plot)
    return {"step": step, "loss": loss_val, "run_dir": str(run_dir)}


def _comm_wait_seconds(plans: list[Any]) -> float | None:
    """This step's exposed CP communication wait (s) over its plans, from ``plan.comm_wait_seconds()`` (CUDA
    events around the ring's waits; 0.0 off CUDA). None when the plans have no such API (older flexdist.cp).
    Called once per step after backward: it synchronises on the last event and resets the plan's record."""
    fns = [getattr(p, "comm_wait_seconds", None) for p in plans]
    fns = [f for f in fns if f is not None]
    if not fns:
        return None
    return float(sum(f() for f in fns))


def _start_profiler(device: torch.device) -> torch.profiler.profile:
    """A started ``torch.profiler`` session for one step (CPU ops, plus CUDA kernels on a GPU)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    prof = torch.profiler.profile(activities=activities)
    prof.start()
    return prof


class _StopSignals:
    """Records SIGTERM / SIGUSR1 instead of dying, so the loop can checkpoint first (main thread only)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        self.received = signum

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)


def _wandb_cfg(cfg: Any) -> dict[str, Any] | None:
    lg = cfg.logger
    if _value(lg.name) != "wandb":
        return None
    return {
        "mode": _value(lg.wandb_mode),
        "project": lg.wandb_project,
        "entity": lg.wandb_entity,
        "name": lg.wandb_name,
        "tags": list(lg.wandb_tags),
    }
