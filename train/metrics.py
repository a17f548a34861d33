"""Rank-0 run logging: one console line per logged step, a progress bar, metrics.jsonl, wandb, a loss plot.

Under context parallelism every step also carries the ``cp_*`` statistics of its plans
(:func:`cp_step_metrics`): all of them in metrics.jsonl and wandb, a short summary on the console line.

Every rank constructs a :class:`RunLogger`; only rank 0's does anything. ``wandb`` is imported only when
``logger=wandb`` (it is not installed everywhere); its run id is kept in ``<run_dir>/wandb_run_id`` so a
resumed run continues the same wandb run. ``metrics.jsonl`` is truncated to the resumed step on resume, so it
always holds exactly one line per logged step of the run's one loss curve.
"""

from __future__ import annotations

import json
import math
import secrets
import sys
from pathlib import Path
from typing import Any


def _fmt(key: str, value: Any) -> str:
    if isinstance(value, float):
        if key == "lr":
            return f"{key} {value:.2e}"
        if key == "loss_avg10":
            return f"avg10 {value:.4f}"
        if key == "step_time_s":
            return f"{value:.2f}s"
        if key == "attn_fwd_s":
            return f"attn fwd {value:.2f}s"
        if key in ("tokens_per_s",):
            return f"tok/s {value:,.0f}"
        if key == "mfu":
            return f"mfu {100 * value:.1f}%" if math.isfinite(value) else "mfu n/a"
        if key == "peak_mem_gib":
            return f"mem {value:.2f}GiB"
        return f"{key} {value:.4f}"
    return f"{key} {value}"


#: the K/V tokens a strategy's forward exchange moves (``Plan.stats`` key); ulysses moves all-to-alls instead
_KV_MOVED = {
    "ring": "kv_tokens_moved_ring",
    "allgather": "kv_tokens_moved_allgather",
    "direct": "kv_tokens_moved_direct",
}


def cp_step_metrics(
    plans: list[Any],
    *,
    num_kv_heads: int,
    head_dim: int,
    dtype_bytes: int,
    comm_wait_s: float | None = None,
) -> dict[str, float]:
    """The ``cp_*`` metrics of one optimizer step from its micro-batches' CP plans (``Plan.stats``; no
    collective: the stats are the same on every rank except the host times, which are this rank's).

    ``cp_work_max_over_mean`` / ``cp_critical_path_over_ideal``: the worst micro-batch's per-rank attention
    work imbalance and ring critical path over a perfect split (1.0 = balanced). ``cp_steps_skipped`` of
    ``cp_steps_total``: off-diagonal (rank, shard) ring steps whose mask is empty, so no kernel runs.
    ``cp_kv_bytes_per_layer`` vs ``cp_kv_min_bytes_per_layer``: K/V bytes one layer's forward exchange moves
    over the whole group (summed over micro-batches) and the minimum the masks need (blocks some other rank's
    queries see); absent for ulysses. ``cp_mask_build_s`` / ``cp_plan_s``: host time building masks / plans.
    ``cp_comm_wait_s``: this rank's exposed communication wait of the step (``comm_wait_s``, measured by the
    trainer with the plans' CUDA events; 0.0 off CUDA, where gloo waits block the host inside the step time;
    NaN when the plans cannot measure it).
    """
    if not plans:
        return {}
    st = [p.stats for p in plans]
    out: dict[str, float] = {
        "cp_work_max_over_mean": max(float(s["work_max_over_mean"]) for s in st),
        "cp_critical_path_over_ideal": max(float(s["critical_path_over_ideal"]) for s in st),
        "cp_steps_skipped": float(sum(s["steps_skipped_compute"] for s in st)),
        "cp_steps_total": float(sum(s["world_size"] * (s["world_size"] - 1) for s in st)),
    }
    per_token = 2 * num_kv_heads * head_dim * dtype_bytes
    moved = [(s, p) for s, p in zip(st, plans, strict=True) if s["strategy"] in _KV_MOVED]
    if moved:
        sent = sum(s[_KV_MOVED[s["strategy"]]] * p.batch_size for s, p in moved) * per_token
        least = sum(s["kv_tokens_min"] * p.batch_size for s, p in moved) * per_token
        out["cp_kv_bytes_per_layer"] = float(sent)
        out["cp_kv_min_bytes_per_layer"] = float(least)
        if least > 0:
            out["cp_kv_over_min"] = sent / least
    out["cp_mask_build_s"] = float(sum(s.get("mask_build_s", 0.0) for s in st))
    out["cp_plan_s"] = float(sum(s.get("plan_time_s", 0.0) for s in st))
    out["cp_comm_wait_s"] = float("nan") if comm_wait_s is None else float(comm_wait_s)
    return out


def _cp_console(m: dict[str, Any]) -> str:
    """One short console segment for the cp_* metrics, e.g. ``cp work max/mean 1.02 skip 3/8 kv/min 1.50``."""
    parts = [f"cp work max/mean {m['cp_work_max_over_mean']:.2f}"] if "cp_work_max_over_mean" in m else []
    if "cp_steps_skipped" in m:
        parts.append(f"skip {m['cp_steps_skipped']:.0f}/{m.get('cp_steps_total', 0):.0f}")
    if "cp_kv_over_min" in m:
        parts.append(f"kv/min {m['cp_kv_over_min']:.2f}")
    if "cp_plan_s" in m:
        parts.append(f"plan {1000 * m['cp_plan_s']:.0f}ms")
    if "cp_comm_wait_s" in m and math.isfinite(m["cp_comm_wait_s"]):
        parts.append(f"wait {1000 * m['cp_comm_wait_s']:.0f}ms")
    return " ".join(parts)


class RunLogger:
    """Console + progress bar + metrics.jsonl (+ wandb) on rank 0; a no-op elsewhere."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        enabled: bool,
        total_steps: int,
        start_step: int,
        progress_bar: bool = True,
        wandb_cfg: dict[str, Any] | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self._bar = None
        self._wandb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._truncate_metrics(start_step)
        if progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True
            )
        if wandb_cfg is not None and wandb_cfg["mode"] != "disabled":
            self._wandb = self._init_wandb(wandb_cfg, config or {})

    def _truncate_metrics(self, start_step: int) -> None:
        """Drop lines past the resumed step (logged by a run that died before its next checkpoint)."""
        if not self.metrics_path.exists():
            return
        keep = []
        for line in self.metrics_path.read_text().splitlines():
            if line.strip() and json.loads(line).get("step", 0) <= start_step:
                keep.append(line)
        self.metrics_path.write_text("".join(k + "\n" for k in keep))

    def _init_wandb(self, wcfg: dict[str, Any], config: dict[str, Any]) -> Any:
        import wandb  # lazily: only logger=wandb needs it

        id_file = self.run_dir / "wandb_run_id"
        if id_file.exists():
            run_id = id_file.read_text().strip()
        else:
            run_id = secrets.token_hex(4)
            id_file.write_text(run_id + "\n")
        return wandb.init(
            project=wcfg["project"],
            entity=wcfg.get("entity"),
            name=wcfg.get("name") or self.run_dir.name,
            tags=list(wcfg.get("tags") or []),
            id=run_id,
            resume="allow",
            dir=str(self.run_dir),
            mode=wcfg["mode"],
            config=config,
        )

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        shown = [_fmt(k, v) for k, v in metrics.items() if not k.startswith("cp_")]
        if any(k.startswith("cp_") for k in metrics):
            shown.append(_cp_console(metrics))
        line = f"step {step:>6d} | " + " | ".join(shown)
        self.print(line)
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def print(self, line: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self, *, plot: bool = True) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if plot:
            try:
                plot_loss_curve(self.metrics_path, self.run_dir / "loss_curve.png")
            except ImportError as e:  # matplotlib is an optional (bench) dependency
                self.print(f"loss_curve.png not written: {e} (pip install matplotlib, or logger.plot=false)")
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curve(metrics_path: str | Path, out_path: str | Path) -> Path | None:
    """Loss against step from metrics.jsonl, as a PNG (matplotlib with the Agg backend: no display)."""
    records = [r for r in read_metrics(metrics_path) if "loss" in r]
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(Path(metrics_path).parent.name)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)
    return Path(out_path)
