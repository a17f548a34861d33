"""train — the Hydra entry point (`python -m train …`, run from the repository root; not installed).

Thin by design: composes flexdist's model, data, CP plan and kernel with Hydra configs from `configs/`.
"""
