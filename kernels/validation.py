"""Argument checks shared by the Triton path and the reference, with messages that name the argument."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttnShape:
    B: int
    Hq: int
    Hkv: int
    Sq: int
    Skv: int
    D: int
    Dv: int

    @property
    def groups(self) -> int:
        return self.Hq // self.Hkv


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, enable_gqa: bool) -> AttnShape:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be [B, H, S, D], got shape {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got q={q.device}, k={k.device}, v={v.device}")
    B, Hq, Sq, D = q.shape
    Bk, Hkv, Skv, Dk = k.shape
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree in [B, H, S]")
    if Bk != B:
        raise ValueError(f"batch sizes differ: q has B={B}, k/v have B={Bk}")
    if Dk != D:
        raise ValueError(f"head dims differ: q has D={D}, k has D={Dk}")
    if Hq != Hkv:
        if not enable_gqa:
            raise ValueError(
                f"q has {Hq} heads and k/v have {Hkv}: pass enable_gqa=True for grouped-query attention"
            )
        if Hq % Hkv != 0:
            raise ValueError(f"enable_gqa needs Hq a multiple of Hkv, got Hq={Hq}, Hkv={Hkv}")
    return AttnShape(B, Hq, Hkv, Sq, Skv, D, v.shape[-1])


def check_block_mask(block_mask, shape: AttnShape) -> None:
    """A BlockMask must cover q and k and broadcast over (B, H)."""
    if block_mask is None:
        return
    for attr in ("kv_num_blocks", "kv_indices", "BLOCK_SIZE", "mask_mod"):
        if not hasattr(block_mask, attr):
            raise TypeError(
                f"block_mask must be a torch BlockMask, got {type(block_mask).__name__} (no {attr})"
            )
    Bm, Hm, Qb = block_mask.kv_num_blocks.shape
    KVb = block_mask.kv_indices.shape[-1]
    QBS, KBS = block_mask.BLOCK_SIZE
    if Bm not in (1, shape.B):
        raise ValueError(f"block_mask batch {Bm} does not broadcast to q's batch {shape.B}")
    if Hm not in (1, shape.Hq):
        raise ValueError(f"block_mask heads {Hm} do not broadcast to q's heads {shape.Hq}")
    if Qb * QBS < shape.Sq:
        raise ValueError(
            f"block_mask covers {Qb} query blocks of {QBS} = {Qb * QBS} tokens but q has Sq={shape.Sq}"
        )
    if KVb * KBS < shape.Skv:
        raise ValueError(
            f"block_mask covers {KVb} kv blocks of {KBS} = {KVb * KBS} tokens but k has Skv={shape.Skv}"
        )
    seq = getattr(block_mask, "seq_lengths", None)
    if seq is not None and tuple(seq) != (shape.Sq, shape.Skv):
        # torch's create_block_mask records the lengths it was built for; a mask built for other lengths
        # would silently mask the wrong tokens.
        raise ValueError(
            f"block_mask was built for (Q_LEN, KV_LEN)={tuple(seq)} but q/k have ({shape.Sq}, {shape.Skv})"
        )


def check_index_map(name: str, idx: torch.Tensor | None, length: int, device: torch.device) -> None:
    if idx is None:
        return
    if idx.dim() != 1 or idx.shape[0] != length:
        raise ValueError(f"{name} must be [{length}] (one global index per token), got {tuple(idx.shape)}")
    if idx.dtype.is_floating_point or idx.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {idx.dtype}")
    if idx.device != device:
        raise ValueError(f"{name} is on {idx.device} but q is on {device}")


KERNEL_HEAD_DIMS = (16, 32, 64, 128)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_kernel_inputs(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, enable_gqa: bool, score_mod=None
) -> AttnShape:
    """check_qkv plus what the Triton kernel supports: head dims, dtypes, devices, score-mod tensor shapes."""
    shape = check_qkv(q, k, v, enable_gqa)
    if q.dtype not in KERNEL_DTYPES:
        raise TypeError(f"the Triton kernel takes q/k/v in float16, bfloat16 or float32, got {q.dtype}")
    if shape.D not in KERNEL_HEAD_DIMS:
        raise ValueError(
            f"the Triton kernel supports head dim D in {KERNEL_HEAD_DIMS}, got q/k head dim {shape.D}"
        )
    if shape.Dv not in KERNEL_HEAD_DIMS:
        raise ValueError(
            f"the Triton kernel supports head dim in {KERNEL_HEAD_DIMS}, got v head dim {shape.Dv}"
        )
    if q.device.type not in ("cuda", "cpu"):
        raise ValueError(f"the Triton kernel runs on CUDA (or the CPU interpreter), got q on {q.device}")
    if shape.Sq == 0 or shape.Skv == 0 or shape.B == 0:
        raise ValueError(f"empty attention: B={shape.B}, Sq={shape.Sq}, Skv={shape.Skv}")
    for name in ("slopes", "table"):
        t = getattr(score_mod, name, None)
        if isinstance(t, torch.Tensor):
            if t.shape[0] != shape.Hq:
                raise ValueError(
                    f"score_mod {type(score_mod).__name__}.{name} has {t.shape[0]} heads but q has Hq={shape.Hq}"
                )
            if t.device != q.device:
                raise ValueError(
                    f"score_mod {type(score_mod).__name__}.{name} is on {t.device} but q on {q.device}"
                )
    return shape
