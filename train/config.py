"""Structured-config schemas of the training run, registered in Hydra's ConfigStore, and their validation.

``configs/config.yaml`` starts its defaults list with ``schema`` (the :class:`Config` dataclass below), so every
YAML option of every group (``configs/model/*.yaml``, …) is merged into a typed node: an unknown key or a
value of the wrong type is a Hydra error at composition, and enums (``dtype``, ``cp_strategy``, …) only accept
their listed values. :func:`validate` then checks what types cannot (divisibility, world size) — before any
process group starts, with the numbers in the message.

This module is the only place that knows the config's shape; ``flexdist`` itself knows nothing of Hydra.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from flexdist.kernels.validation import KERNEL_HEAD_DIMS
from flexdist.model.llama import checkpointing_mode

#: ``trainer.compile_scope`` values (see TrainerConfig)
COMPILE_SCOPES = ("regions", "blocks")


class AttnBackend(Enum):
    """Backend of the flexdist kernel: ``auto`` (Triton on CUDA, reference elsewhere), or forced."""

    auto = "auto"
    triton = "triton"
    reference = "reference"


class DataSource(Enum):
    stdlib = "stdlib"  # the Python standard library's own .py files (nothing to download)
    text = "text"  # a folder of text files
    jsonl = "jsonl"  # a JSONL file, one document per line
    tokens = "tokens"  # pre-tokenised .npy / .bin token ids with an end-of-document id


class CPStrategy(Enum):
    ring = "ring"  # K/V shards travel around the ring, overlapped with compute; empty steps skipped
    allgather = "allgather"  # all-gather K/V once, then local attention
    direct = (
        "direct"  # each step a shift-by-t P2P exchange of exactly the K/V blocks the receiver's mask needs
    )
    ulysses = "ulysses"  # all-to-all to head shards of the whole sequence (needs heads divisible by cp)


class CPBalance(Enum):
    auto = "auto"  # the planner picks the best-balanced sharding for the batch
    contiguous = "contiguous"  # rank r holds the r-th contiguous chunk
    zigzag = "zigzag"  # chunks r and 2·cp−1−r (balances plain causal masks)
    document = "document"  # whole documents balanced by their attention work


class DType(Enum):
    bf16 = "bf16"  # bf16 parameters for compute, fp32 master weights and gradient reduction (GPU)
    fp32 = "fp32"  # everything in fp32 (CPU default)
    auto = "auto"  # bf16 on CUDA, fp32 on CPU


class Device(Enum):
    auto = "auto"  # CUDA + NCCL when a GPU is visible, else CPU + gloo
    cuda = "cuda"
    cpu = "cpu"


class LoggerName(Enum):
    console = "console"  # progress bar + one line per logged step + metrics.jsonl
    wandb = "wandb"  # console, plus Weights & Biases


class WandbMode(Enum):
    online = "online"
    offline = "offline"  # written under <run_dir>/wandb, `wandb sync` it later
    disabled = "disabled"


@dataclass
class ModelConfig:
    """A Llama-style decoder (flexdist.model.LlamaConfig)."""

    name: str = MISSING  # label of the size (tiny, 125m, …), used in logs only
    dim: int = MISSING  # residual stream width
    n_layers: int = MISSING  # number of transformer blocks
    n_heads: int = MISSING  # query heads; head dim = dim / n_heads (the Triton kernel: 16, 32, 64 or 128)
    n_kv_heads: int = MISSING  # key/value heads (GQA); must divide n_heads
    ffn_hidden_dim: int = MISSING  # SwiGLU inner width
    vocab_size: int | None = None  # null: the data's vocabulary rounded up to a multiple of 64
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base; positions restart at 0 in every document
    tie_embeddings: bool = False  # share the input embedding and the output projection
    init_std: float = 0.02  # std of the Llama-style init (depth-scaled for residual projections)
    attn_backend: AttnBackend = AttnBackend.auto  # kernel backend (reference = dense fp32, small S only)


@dataclass
class DataConfig:
    """Where documents come from; they are packed into windows of trainer.seq_len tokens."""

    source: DataSource = DataSource.stdlib  # stdlib | text | jsonl | tokens
    path: str | None = None  # folder (text), file (jsonl, tokens); unused for stdlib
    pattern: str = "**/*.txt"  # glob under path for source=text
    text_field: str = "text"  # JSON field holding the document for source=jsonl
    eod_token: int | None = None  # end-of-document id for source=tokens (required there)
    vocab_size: int | None = None  # vocabulary size for source=tokens (required there)
    token_dtype: str = "uint16"  # dtype of a raw .bin token file
    shuffle: bool = True  # shuffle the document order each epoch (seeded by trainer.seed and the epoch)
    max_docs: int | None = None  # keep only the first N documents (stdlib, text, jsonl; tests, quick looks)


@dataclass
class ParallelConfig:
    """The (dp, cp) device mesh: dp replicas of the data, each sequence split over cp ranks."""

    dp: int = -1  # data-parallel degree; -1 = world_size / cp
    cp: int = 1  # context-parallel degree: ranks that share one sequence
    cp_strategy: CPStrategy = CPStrategy.ring  # how K/V reach every rank of the cp group
    cp_balance: CPBalance = CPBalance.auto  # how the sequence's tokens are assigned to cp ranks
    block_size: int = 128  # BlockMask block size (tokens); seq_len must be divisible as the plan needs
    # cp_strategy=ring only: forward / dQ kernel calls per group of this many ring steps (1 = plain ring;
    # experimental, see flexdist.cp.plan(ring_group=...))
    cp_ring_group: int = 1
    # cp_strategy=allgather only: gather K/V and run the kernels in this many chunks of K/V heads, each
    # chunk's all-gather overlapping the previous chunk's kernels (1 = unpipelined; see
    # flexdist.cp.plan(head_chunks=...)). null: the strategy's default, min(2, model.n_kv_heads) for
    # allgather (the fastest measured, README "Measured" s11), 1 for the others.
    cp_head_chunks: int | None = None
    # cp_strategy=allgather only: the first chunk's heads attend to the rank's own K/V shard while that chunk's
    # gather runs, then merge the other ranks' keys into it (hides the one exposed gather; see
    # flexdist.cp.plan(local_first=...)). Needs seq_len / cp to be a multiple of block_size. null: the
    # strategy's default, true for allgather, false for the others.
    cp_local_first: bool | None = None
    # cp_strategy=allgather only: K/V heads per chunk of the backward's pipeline, e.g. [1, 7] for 8 K/V heads
    # (a small first chunk shortens the backward's one exposed gather; flexdist.cp.plan(bwd_head_chunks=...)).
    # null: the forward's chunks. Measured (s16): +1.6-3.2% backward in the 8-rank simulation, -3.5% to
    # +1.2% on 2 real H100s, 7% more peak memory; so not the default.
    cp_bwd_head_chunks: list[int] | None = None
    fsdp: bool = True  # shard parameters, gradients and optimizer state over all dp×cp ranks (FSDP2)


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to min_lr_ratio · lr."""

    name: str = "adamw"  # only adamw
    lr: float = 3e-4  # peak learning rate
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # Adam betas
    eps: float = 1e-8  # Adam epsilon
    weight_decay: float = 0.1  # decoupled weight decay on matrices (not on norms / embeddings)
    warmup_steps: int = 100  # linear warmup from 0 to lr over this many steps
    min_lr_ratio: float = 0.1  # cosine decays to lr · min_lr_ratio at trainer.steps
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = off)


@dataclass
class LoggerConfig:
    """Rank-0 logging: console line + progress bar + metrics.jsonl always; wandb optionally."""

    name: LoggerName = LoggerName.console  # console | wandb
    progress_bar: bool = True  # a tqdm progress bar on rank 0 (log lines are printed above it)
    plot: bool = True  # write loss_curve.png into the run dir at the end (matplotlib, Agg)
    wandb_mode: WandbMode = WandbMode.offline  # online | offline | disabled
    wandb_project: str = "flexdist"  # wandb project
    wandb_entity: str | None = None  # wandb entity (team/user); null = your default
    wandb_name: str | None = None  # run name shown in wandb; null = the run dir's name
    wandb_tags: list[str] = field(default_factory=list)  # wandb tags


@dataclass
class TrainerConfig:
    """The loop: how long, how big, what precision, when to checkpoint and log."""

    steps: int = 200  # optimizer steps to train for (resume continues up to this)
    seq_len: int = 2048  # tokens per packed window (the whole sequence, before CP splits it)
    micro_batch: int = 1  # windows per dp rank per forward/backward
    grad_accum: int = 1  # micro-batches per optimizer step
    dtype: DType = DType.auto  # bf16 | fp32 | auto (bf16 on CUDA with FSDP, else fp32)
    device: Device = Device.auto  # auto | cuda | cpu
    compile: bool = False  # torch.compile the transformer blocks (how much of each: compile_scope)
    # regions: each block's projections + RoPE, norms and SwiGLU, the attention op left eager | blocks: each
    # block's whole forward with fullgraph=True, attention included (the flexdist custom ops: document
    # structure and CP plans are tensor inputs, so a new batch does not recompile; cp_strategy ring, direct or
    # allgather). attn_fwd_s is not measured inside compiled blocks (host timing would break the graph).
    compile_scope: str = "regions"
    compile_backend: str = "inductor"  # torch.compile backend (tests on CPU use aot_eager: no C++ build)
    # none | selective (recompute each block in backward except its attention op, whose output and LSE stay
    # saved: the CP ring never runs twice) | full (recompute whole blocks, attention and ring included);
    # the old booleans still work: true = selective, false = none
    activation_checkpointing: str = "none"
    ckpt_interval: int = 0  # save a checkpoint every N steps (and at the end); 0 = only at the end
    keep_last: int = 2  # keep the K most recent checkpoints
    resume: bool = True  # continue from the newest complete checkpoint in run_dir if there is one
    seed: int = 0  # seeds the model init (identical on every rank) and the data order
    log_interval: int = 1  # print / record metrics every N steps
    run_dir: str = MISSING  # checkpoints, metrics.jsonl, loss_curve.png, wandb/, .hydra/ (same on every rank)
    peak_tflops: float | None = None  # peak dense bf16 TFLOP/s of one device for MFU; null = known GPUs only
    max_nan_steps: int = 0  # non-finite losses tolerated (the step is skipped) before the run stops
    stop_at: int | None = (
        None  # end this invocation after step N (checkpointed); the schedule still spans `steps`
    )
    dist_timeout_s: int = (
        600  # process-group timeout: a rank stuck this long fails the run instead of hanging
    )
    # steps (1-based) to record with torch.profiler: every rank writes <run_dir>/profile/step_<N>_rank<R>.json
    # (a Chrome trace: chrome://tracing or https://ui.perfetto.dev); [] = never
    profile_steps: list[int] = field(default_factory=list)


@dataclass
class Config:
    """The whole run: ``python -m train model=350m parallel.cp=4 trainer.seq_len=65536``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


def register_configs() -> None:
    """Register the schema as ``schema`` (the first entry of configs/config.yaml's defaults list)."""
    ConfigStore.instance().store(name="schema", node=Config)


@dataclass
class Resolved:
    """Numbers derived from the config and the world size by :func:`validate`."""

    world_size: int
    dp: int
    cp: int
    head_dim: int
    seq_multiple: int
    tokens_per_step: int
    cp_head_chunks: int = 1  # parallel.cp_head_chunks with null resolved for the strategy
    cp_local_first: bool = False  # parallel.cp_local_first likewise
    cp_bwd_head_chunks: tuple[int, ...] | None = None  # parallel.cp_bwd_head_chunks (null: the forward's)


def _get(cfg: Any, dotted: str) -> Any:
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node.value if isinstance(node, Enum) else node


def unknown_keys(cfg: Any) -> list[str]:
    """Keys the schema does not have. Hydra's struct mode rejects them, except those added on purpose with
    ``+key=value`` (Hydra opens the struct for that); nothing would read them, so they are errors too."""
    errors = []
    sections = {f.name: f.type for f in fields(Config)}
    schemas = {
        "model": ModelConfig,
        "data": DataConfig,
        "parallel": ParallelConfig,
        "optim": OptimConfig,
        "logger": LoggerConfig,
        "trainer": TrainerConfig,
    }
    for key in cfg:
        if key not in sections:
            errors.append(f"unknown config key {key!r} (groups: {', '.join(sections)})")
            continue
        allowed = {f.name for f in fields(schemas[key])}
        errors += [f"unknown config key '{key}.{k}'" for k in cfg[key] if k not in allowed]
    return errors


def seq_len_multiple(cp: int, block_size: int, balance: str) -> int:
    """What seq_len must be a multiple of: cp × block_size, ×2 when the plan may split into 2·cp chunks."""
    if cp == 1:
        return 1
    return cp * block_size * (2 if balance in ("zigzag", "auto") else 1)


# The all-gather's local_first hides the first chunk's gather behind a call over the rank's own keys, at the
# price of one more kernel call and an fp32 round trip of that chunk's output. It pays only when the gather is
# large: measured with direct launches and the host issuing ahead (bench/results/2026-11-26-s12), the
# forward with local_first took +6% at 8k tokens per GPU on 2 GPUs and +3% at 8k on 4 (8k and 24k remote
# tokens per rank), the same at 16k on 4 (48k), and it won at 32k on 4 (96k, training steps, s11) and in the
# 8-rank simulation at 8k (56k). So null resolves to true from this many remote tokens per rank.
LOCAL_FIRST_MIN_REMOTE_TOKENS = 48 * 1024


def cp_knobs(
    strategy: str,
    head_chunks: int | None,
    local_first: bool | None,
    n_kv_heads: int,
    seq_len: int | None = None,
    cp: int = 1,
) -> tuple:
    """``(head_chunks, local_first)`` with ``None`` (null in the config) resolved for the strategy: the
    pipelined all-gather (two chunks, fewer for MQA) for ``allgather``, with ``local_first`` when each rank
    gathers at least ``LOCAL_FIRST_MIN_REMOTE_TOKENS`` tokens of the other ranks' K/V (``(cp - 1) · seq_len /
    cp``; unknown ``seq_len``: on); off otherwise, so ``parallel.cp_strategy=ring`` alone switches strategy."""
    ag = strategy == "allgather"
    hc = head_chunks if head_chunks is not None else (max(1, min(2, n_kv_heads)) if ag else 1)
    if local_first is not None:
        return hc, local_first
    remote = None if seq_len is None else (cp - 1) * seq_len // max(cp, 1)
    return hc, ag and (remote is None or remote >= LOCAL_FIRST_MIN_REMOTE_TOKENS)


def validate(cfg: Any, world_size: int) -> Resolved:
    """Check the composed config against ``world_size``; raise ValueError naming the keys and the numbers.

    Runs before any process group exists (world size from torchrun's ``WORLD_SIZE``), so a bad launch fails
    in a second with a readable message rather than as a hang or a shape error deep in a collective.
    """
    g = lambda k: _get(cfg, k)
    errors: list[str] = unknown_keys(cfg)
    cp, dp = g("parallel.cp"), g("parallel.dp")
    if cp < 1:
        errors.append(f"parallel.cp={cp} must be >= 1")
    if dp == -1 and cp >= 1:
        if world_size % cp:
            errors.append(
                f"parallel.cp={cp} does not divide the world size {world_size} (parallel.dp=-1 is auto)"
            )
        dp = max(world_size // max(cp, 1), 1)
    elif dp < 1:
        errors.append(f"parallel.dp={dp} must be >= 1 or -1 (auto)")
    elif dp * cp != world_size:
        errors.append(f"parallel.dp × parallel.cp = {dp} × {cp} = {dp * cp} != world size {world_size}")
    bs = g("parallel.block_size")
    if bs < 1 or bs & (bs - 1) or bs < 16:
        errors.append(f"parallel.block_size={bs} must be a power of two >= 16")
    seq = g("trainer.seq_len")
    mult = seq_len_multiple(max(cp, 1), bs, g("parallel.cp_balance"))
    if seq < 2:
        errors.append(f"trainer.seq_len={seq} must be >= 2")
    elif seq % mult:
        why = f"parallel.cp × parallel.block_size = {cp} × {bs}"
        if mult != cp * bs:
            why += f" × 2 (cp_balance={g('parallel.cp_balance')} splits into 2·cp chunks)"
        errors.append(f"trainer.seq_len={seq} is not divisible by {why} = {mult}")
    dim, nh, nkv = g("model.dim"), g("model.n_heads"), g("model.n_kv_heads")
    head_dim = dim // nh if nh > 0 else 0
    if nh < 1 or nkv < 1:
        errors.append(f"model.n_heads={nh} and model.n_kv_heads={nkv} must be >= 1")
    else:
        if nh % nkv:
            errors.append(f"model.n_heads={nh} is not a multiple of model.n_kv_heads={nkv} (GQA)")
        if dim % nh:
            errors.append(f"model.dim={dim} is not divisible by model.n_heads={nh}")
        elif head_dim % 2:
            errors.append(
                f"head dim model.dim / model.n_heads = {dim} / {nh} = {head_dim} must be even (RoPE)"
            )
        elif g("model.attn_backend") != "reference" and head_dim not in KERNEL_HEAD_DIMS:
            errors.append(
                f"head dim model.dim / model.n_heads = {dim} / {nh} = {head_dim} is not supported by the Triton "
                f"kernel (supported: {', '.join(map(str, KERNEL_HEAD_DIMS))}; model.attn_backend=reference "
                "takes any even head dim, slowly)"
            )
    if cp > 1 and g("parallel.cp_strategy") == "ulysses" and nkv >= 1 and (nh % cp or nkv % cp):
        errors.append(
            f"parallel.cp_strategy=ulysses splits heads over the cp ranks: model.n_heads={nh} and "
            f"model.n_kv_heads={nkv} must both be divisible by parallel.cp={cp}"
        )
    # strategy-specific knobs: >= 1, and above 1 only with their strategy (null: the strategy's default)
    strategy = g("parallel.cp_strategy")
    for key, strat, what in (
        ("parallel.cp_ring_group", "ring", "groups ring steps"),
        ("parallel.cp_head_chunks", "allgather", "pipelines the all-gather"),
    ):
        n = g(key)
        if n is None:
            continue
        if n < 1:
            errors.append(f"{key}={n} must be >= 1")
        elif n > 1 and strategy != strat:
            errors.append(f"{key}={n} {what}: it needs parallel.cp_strategy={strat}, got {strategy}")
    bhc = g("parallel.cp_bwd_head_chunks")
    if bhc is not None:
        bhc = [int(x) for x in bhc]
        if not bhc or min(bhc) < 1:
            errors.append(f"parallel.cp_bwd_head_chunks={bhc} must list K/V heads per chunk, each >= 1")
        elif strategy != "allgather":
            errors.append(
                f"parallel.cp_bwd_head_chunks={bhc} pipelines the all-gather's backward: it needs "
                f"parallel.cp_strategy=allgather, got {strategy}"
            )
        elif nkv >= 1 and sum(bhc) != nkv:
            errors.append(f"parallel.cp_bwd_head_chunks={bhc} sums to {sum(bhc)}, not model.n_kv_heads={nkv}")
    if g("parallel.cp_local_first") and strategy != "allgather":
        errors.append(
            "parallel.cp_local_first=true overlaps the all-gather: it needs parallel.cp_strategy=allgather, "
            f"got {strategy}"
        )
    hc, lf = cp_knobs(strategy, g("parallel.cp_head_chunks"), g("parallel.cp_local_first"), nkv, seq, cp)
    if hc > 1 and nkv >= 1 and hc > nkv:
        errors.append(f"parallel.cp_head_chunks={hc} is more than model.n_kv_heads={nkv}")
    for key in ("trainer.steps", "trainer.micro_batch", "trainer.grad_accum", "trainer.log_interval"):
        if g(key) < 1:
            errors.append(f"{key}={g(key)} must be >= 1")
    if g("trainer.stop_at") is not None and g("trainer.stop_at") < 1:
        errors.append(f"trainer.stop_at={g('trainer.stop_at')} must be >= 1 or null")
    for key in ("trainer.ckpt_interval", "optim.warmup_steps", "trainer.max_nan_steps"):
        if g(key) < 0:
            errors.append(f"{key}={g(key)} must be >= 0")
    try:
        checkpointing_mode(g("trainer.activation_checkpointing"))
    except ValueError as e:
        errors.append(f"trainer.{e}")
    scope = g("trainer.compile_scope")
    if scope not in COMPILE_SCOPES:
        errors.append(f"trainer.compile_scope={scope!r} must be one of {COMPILE_SCOPES}")
    elif g("trainer.compile") and scope == "blocks" and cp > 1 and g("parallel.cp_strategy") == "ulysses":
        errors.append(
            "trainer.compile_scope=blocks compiles the CP attention custom op, which covers "
            "parallel.cp_strategy ring, direct and allgather, not ulysses; use trainer.compile_scope=regions for ulysses"
        )
    bad = [x for x in g("trainer.profile_steps") if x < 1]
    if bad:
        errors.append(
            f"trainer.profile_steps={list(g('trainer.profile_steps'))}: steps are 1-based, got {bad}"
        )
    if g("trainer.keep_last") < 1:
        errors.append(f"trainer.keep_last={g('trainer.keep_last')} must be >= 1")
    if g("trainer.dtype") == "bf16" and not g("parallel.fsdp"):
        errors.append("trainer.dtype=bf16 needs parallel.fsdp=true (bf16 compute is FSDP2's mixed precision)")
    if g("optim.name") != "adamw":
        errors.append(f"optim.name={g('optim.name')!r}: only 'adamw' is implemented")
    if not 0.0 <= g("optim.min_lr_ratio") <= 1.0:
        errors.append(f"optim.min_lr_ratio={g('optim.min_lr_ratio')} must be in [0, 1]")
    if len(g("optim.betas")) != 2:
        errors.append(f"optim.betas={list(g('optim.betas'))} must have 2 values")
    src = g("data.source")
    if src in ("text", "jsonl", "tokens") and not g("data.path"):
        errors.append(f"data.source={src} needs data.path")
    if src == "tokens" and (g("data.eod_token") is None or g("data.vocab_size") is None):
        errors.append("data.source=tokens needs data.eod_token and data.vocab_size")
    if errors:
        raise ValueError("invalid training config:\n  - " + "\n  - ".join(errors))
    return Resolved(
        world_size=world_size,
        dp=dp,
        cp=cp,
        head_dim=head_dim,
        seq_multiple=mult,
        tokens_per_step=dp * g("trainer.micro_batch") * g("trainer.grad_accum") * seq,
        cp_head_chunks=hc,
        cp_local_first=bool(lf and cp > 1),
        cp_bwd_head_chunks=None if bhc is None else tuple(bhc),
    )
