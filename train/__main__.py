"""``python -m train [hydra overrides]`` — the Hydra entry point of a training run (see train/trainer.py).

Hydra and torchrun together: every rank composes the same config, so the run directory must not depend on the
moment a rank starts. It is ``trainer.run_dir``, which defaults to ``$FLEXDIST_RUN_DIR``; the launch scripts
compute that once. When it is unset this entry point derives it once per launch: ``runs/<torchrun run id>``
under torchrun (the id is shared by all ranks), ``runs/<timestamp>`` for a single process. Hydra's own output
(``.hydra/config.yaml``, overrides, ``train.log``) goes into the run directory, written by rank 0 only.
"""

from __future__ import annotations

import os
import sys
import time

import hydra
from omegaconf import DictConfig

from .config import register_configs


def _prepare_environment() -> None:
    if "FLEXDIST_RUN_DIR" not in os.environ:
        run_id = os.environ.get("TORCHELASTIC_RUN_ID")
        if run_id and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            os.environ["FLEXDIST_RUN_DIR"] = os.path.join("runs", run_id)
        else:
            os.environ["FLEXDIST_RUN_DIR"] = os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    if int(os.environ.get("RANK", "0")) != 0:
        # only rank 0 writes Hydra's output files and log file
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]


@hydra.main(config_path="../configs", config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    import torch.distributed as dist

    from .trainer import run

    try:
        run(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main() -> None:
    register_configs()
    _prepare_environment()
    _hydra_main()


if __name__ == "__main__":
    main()
