"""train — the Hydra entry point (`python -m train …`, run from the repository root; not installed).

Thin by design: composes flexdist's model (``flexdist.model``), packed data (``flexdist.data``), CP plan and
kernel with the Hydra configs of ``configs/``.

- ``train/config.py``: the structured-config schema (ConfigStore) and ``validate`` (checks before any process
  group starts);
- ``train/trainer.py``: the loop, top to bottom (launch commands in its docstring);
- ``train/checkpoint.py``: atomic DCP checkpoints (model, optimizer, scheduler, data loader, step, RNG);
- ``train/metrics.py``: rank-0 console line, progress bar, ``metrics.jsonl``, wandb, loss-curve PNG;
- ``train/__main__.py``: ``@hydra.main``, one run directory for all ranks, Hydra output on rank 0 only.
"""
