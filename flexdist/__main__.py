"""``python -m flexdist --version``: print versions of flexdist, torch and triton (a sanity entry point)."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flexdist", description=__doc__)
    parser.add_argument("--version", action="store_true", help="print versions and exit")
    parser.parse_args(argv)
    import torch

    import flexdist

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # pragma: no cover - triton is a dependency, but say so plainly if it is missing
        triton_version = "not installed"
    cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    print(f"flexdist {flexdist.__version__}  torch {torch.__version__}  triton {triton_version}  ({cuda})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
