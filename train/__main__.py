"""Placeholder main job until the training run lands: an attention demo on a document-packed sequence.

Runs flexdist.kernels.flex_attention on a random document-causal pack and checks it against the dense
reference. Works under torchrun (every rank runs it; rank 0 prints).
"""

from __future__ import annotations

import os

import torch
from torch.nn.attention.flex_attention import create_block_mask

from flexdist.kernels import DocumentMaskMod, flex_attention, flex_attention_reference


def main() -> None:
    rank = int(os.environ.get("RANK", "0"))
    torch.manual_seed(0)
    B, H, S, D = 1, 2, 256, 64
    lengths = torch.tensor([100, 30, 90, 36])
    doc = torch.repeat_interleave(torch.arange(len(lengths)), lengths)[None]
    pos = torch.arange(S)[None]
    bm = create_block_mask(DocumentMaskMod(doc, doc, pos, pos), B, None, S, S, device="cpu", BLOCK_SIZE=64)
    q, k, v = (torch.randn(B, H, S, D) for _ in range(3))
    out = flex_attention(q, k, v, block_mask=bm)
    ref = flex_attention_reference(q, k, v, block_mask=bm)
    if rank == 0:
        print(
            f"document-causal attention on {S} tokens, {len(lengths)} documents: "
            f"max |flexdist - reference| = {(out - ref).abs().max().item():.2e}"
        )


if __name__ == "__main__":
    main()
