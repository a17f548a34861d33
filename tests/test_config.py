"""Hydra config tree: composition of every option, typed schema errors, validation messages with numbers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from train.config import LOCAL_FIRST_MIN_REMOTE_TOKENS, register_configs, validate  # noqa: E402

CONFIGS = ROOT / "configs"


def make(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_default_config_composes_and_validates() -> None:
    cfg = make("trainer.run_dir=/tmp/x")
    assert cfg.model.name == "tiny" and cfg.parallel.cp == 1 and cfg.data.source.value == "stdlib"
    res = validate(cfg, world_size=2)
    assert (res.dp, res.cp) == (2, 1)
    assert res.tokens_per_step == 2 * cfg.trainer.seq_len
    OmegaConf.to_container(cfg, resolve=True)  # everything resolves (what wandb gets)


@pytest.mark.parametrize("model", sorted(p.stem for p in (CONFIGS / "model").glob("*.yaml")))
@pytest.mark.parametrize("trainer", sorted(p.stem for p in (CONFIGS / "trainer").glob("*.yaml")))
def test_every_model_and_trainer_option_composes(model: str, trainer: str) -> None:
    cfg = make(f"model={model}", f"trainer={trainer}", "parallel=cp", "parallel.cp=2")
    assert cfg.model.name == model
    validate(cfg, world_size=4)


@pytest.mark.parametrize("group", ["data", "logger", "optim", "parallel"])
def test_every_option_of_the_other_groups_composes(group: str) -> None:
    for p in sorted((CONFIGS / group).glob("*.yaml")):
        extra = ["data.path=/x", "data.eod_token=0", "data.vocab_size=10"] if p.stem == "tokens" else []
        extra += ["data.path=/x"] if p.stem in ("text", "jsonl") else []
        cfg = make(f"{group}={p.stem}", *extra)
        OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("model", sorted(p.stem for p in (CONFIGS / "model").glob("*.yaml")))
def test_cp_knobs_follow_the_strategy(model: str) -> None:
    """parallel=cp is the pipelined all-gather (what measured fastest), with local_first once each rank
    gathers enough remote tokens; its knobs are null, resolved per strategy, so switching the strategy alone
    (or parallel=cp_ring) gives the plain ring, and an MQA model gets one chunk instead of an error. Explicit
    values win."""
    long = ("parallel.cp=4", "trainer.seq_len=131072")  # 96k remote tokens per rank: local_first
    edge = ("parallel.cp=4", "trainer.seq_len=65536")  # 48k: the threshold itself
    short = ("parallel.cp=4", "trainer.seq_len=32768")  # 24k: measured slower with local_first
    cases = [
        ((), ("allgather", 2, False)),  # default seq_len 2048 over cp = 2
        (long, ("allgather", 2, True)),
        (edge, ("allgather", 2, True)),
        (short, ("allgather", 2, False)),
        (("parallel.cp_strategy=ring", *long), ("ring", 1, False)),
        (("parallel.cp_strategy=direct",), ("direct", 1, False)),
        (("model.n_kv_heads=1", *long), ("allgather", 1, True)),
        (("parallel.cp_head_chunks=1", "parallel.cp_local_first=false", *long), ("allgather", 1, False)),
        (("parallel.cp_local_first=true", *short), ("allgather", 2, True)),
    ]
    for extra, (strategy, hc, lf) in cases:
        cfg = make(f"model={model}", "parallel=cp", *extra)
        res = validate(cfg, world_size=4 if "parallel.cp=4" in extra else 2)
        assert (cfg.parallel.cp_strategy.value, res.cp_head_chunks, res.cp_local_first) == (
            strategy,
            hc,
            lf,
        ), extra
    assert LOCAL_FIRST_MIN_REMOTE_TOKENS == 48 * 1024
    # the backward's own chunks: null follows the forward's, a list reaches the plan as a tuple
    res = validate(make(f"model={model}", "parallel=cp", *long), world_size=4)
    assert res.cp_bwd_head_chunks is None
    nkv = make(f"model={model}").model.n_kv_heads
    spec = [1, nkv - 1] if nkv > 1 else [1]
    arg = f"parallel.cp_bwd_head_chunks=[{','.join(map(str, spec))}]"
    res = validate(make(f"model={model}", "parallel=cp", arg, *long), world_size=4)
    assert res.cp_bwd_head_chunks == tuple(spec)
    ring = make(f"model={model}", "parallel=cp_ring")
    res = validate(ring, world_size=2)
    assert (ring.parallel.cp_strategy.value, res.cp_head_chunks, res.cp_local_first) == ("ring", 1, False)


def test_the_readme_override_example() -> None:
    cfg = make("model=350m", "parallel=cp", "parallel.cp=4", "trainer.seq_len=65536")
    assert (cfg.model.dim, cfg.parallel.cp, cfg.trainer.seq_len) == (1024, 4, 65536)
    res = validate(cfg, world_size=8)
    assert (res.dp, res.cp) == (2, 4)


@pytest.mark.parametrize(
    "override",
    [
        "trainer.stepz=3",  # typo in a key
        "trainer.steps=ten",  # wrong type
        "trainer.compile=maybe",  # not a bool
        "parallel.cp_strategy=tree",  # not an enum value
        "model=13b",  # no such option
    ],
)
def test_typos_and_wrong_types_are_errors(override: str) -> None:
    with pytest.raises((ConfigCompositionException, OmegaConfBaseException)):
        make(override)


def test_unknown_key_in_a_yaml_option_is_an_error(tmp_path) -> None:
    import shutil

    shutil.copytree(CONFIGS, tmp_path / "configs")
    (tmp_path / "configs" / "model" / "bad.yaml").write_text("name: bad\ndim: 64\nn_layer: 2\n")
    register_configs()
    with (
        initialize_config_dir(config_dir=str(tmp_path / "configs"), version_base="1.3"),
        pytest.raises((ConfigCompositionException, OmegaConfBaseException), match="n_layer"),
    ):
        compose("config", overrides=["model=bad"])


@pytest.mark.parametrize(
    ("overrides", "world", "message"),
    [
        (["parallel.dp=2", "parallel.cp=2"], 3, "parallel.dp × parallel.cp = 2 × 2 = 4 != world size 3"),
        (["parallel=cp", "parallel.cp=4"], 6, "parallel.cp=4 does not divide the world size 6"),
        (
            ["parallel=cp", "parallel.cp=4", "parallel.cp_balance=zigzag", "trainer.seq_len=1536"],
            4,
            r"trainer.seq_len=1536 is not divisible by parallel.cp × parallel.block_size = 4 × 128 × 2 "
            r"\(cp_balance=zigzag splits into 2·cp chunks\) = 1024",
        ),
        (
            ["parallel=cp", "parallel.cp=2", "parallel.cp_balance=contiguous", "trainer.seq_len=300"],
            2,
            "trainer.seq_len=300 is not divisible by parallel.cp × parallel.block_size = 2 × 128 = 256",
        ),
        (
            ["model.n_heads=4", "model.n_kv_heads=3"],
            1,
            r"model.n_heads=4 is not a multiple of model.n_kv_heads=3",
        ),
        (["model.dim=120"], 1, r"head dim model.dim / model.n_heads = 120 / 4 = 30 is not supported"),
        (["model.dim=1024", "model.n_heads=4"], 1, r"= 1024 / 4 = 256 is not supported by the Triton kernel"),
        (["model.dim=36", "model.attn_backend=reference"], 1, r"= 36 / 4 = 9 must be even \(RoPE\)"),
        (["model.dim=130"], 1, r"model.dim=130 is not divisible by model.n_heads=4"),
        (
            ["parallel=cp", "parallel.cp=4", "parallel.cp_strategy=ulysses"],
            4,
            r"model.n_heads=4 and model.n_kv_heads=2 must both be divisible by parallel.cp=4",
        ),
        (["trainer.dtype=bf16", "parallel.fsdp=false"], 1, "trainer.dtype=bf16 needs parallel.fsdp=true"),
        (["+trainer.new_key=1"], 1, "unknown config key 'trainer.new_key'"),
        (["trainer.grad_accum=0"], 1, "trainer.grad_accum=0 must be >= 1"),
        (["parallel=cp", "parallel.cp_ring_group=0"], 2, "parallel.cp_ring_group=0 must be >= 1"),
        (
            ["parallel=cp", "parallel.cp_strategy=allgather", "parallel.cp_ring_group=2"],
            2,
            "parallel.cp_ring_group=2 groups ring steps: it needs parallel.cp_strategy=ring, got allgather",
        ),
        (["parallel=cp", "parallel.cp_head_chunks=0"], 2, "parallel.cp_head_chunks=0 must be >= 1"),
        (
            ["parallel=cp_ring", "parallel.cp_head_chunks=2"],
            2,
            "parallel.cp_head_chunks=2 pipelines the all-gather: it needs parallel.cp_strategy=allgather, got ring",
        ),
        (  # an explicit all-gather knob with another strategy stays an error
            ["parallel=cp", "parallel.cp_strategy=ring", "parallel.cp_head_chunks=2"],
            2,
            "parallel.cp_head_chunks=2 pipelines the all-gather: it needs parallel.cp_strategy=allgather, got ring",
        ),
        (
            ["parallel=cp", "parallel.cp_strategy=allgather", "parallel.cp_head_chunks=3"],
            2,
            r"parallel.cp_head_chunks=3 is more than model.n_kv_heads=2",
        ),
        (
            ["parallel=cp", "parallel.cp_bwd_head_chunks=[1,2]"],
            2,
            r"parallel.cp_bwd_head_chunks=\[1, 2\] sums to 3, not model.n_kv_heads=2",
        ),
        (
            ["parallel=cp_ring", "parallel.cp_bwd_head_chunks=[1,1]"],
            2,
            r"parallel.cp_bwd_head_chunks=\[1, 1\] pipelines the all-gather's backward: it needs "
            "parallel.cp_strategy=allgather, got ring",
        ),
        (["parallel=cp", "parallel.cp_bwd_head_chunks=[0,2]"], 2, r"each >= 1"),
        (
            ["parallel=cp_ring", "parallel.cp_local_first=true"],
            2,
            "parallel.cp_local_first=true overlaps the all-gather: it needs parallel.cp_strategy=allgather, got ring",
        ),
        (["data=jsonl", "data.path=null"], 1, "data.source=jsonl needs data.path"),
    ],
)
def test_validation_errors_carry_the_numbers(overrides: list[str], world: int, message: str) -> None:
    cfg = make(*overrides)
    with pytest.raises(ValueError, match=message):
        validate(cfg, world_size=world)


def test_bad_config_fails_before_any_process_group(tmp_path) -> None:
    """torchrun-style env with an impossible mesh: exits at once with the numbers, no rendezvous attempted."""
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "FLEXDIST_RUN_DIR": str(tmp_path)}
    env.pop("MASTER_ADDR", None)
    proc = subprocess.run(
        [sys.executable, "-m", "train", "parallel.dp=3"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "parallel.dp × parallel.cp = 3 × 1 = 3 != world size 2" in proc.stderr + proc.stdout
