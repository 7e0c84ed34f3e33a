"""Helpers shared by test modules (not fixtures)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "lightning_configs"


def tiny_fit_args(data_root: Path, run_root: Path, name: str = "t", epochs: int = 1, **overrides: object) -> list[str]:
    """CLI arguments for a seconds-long AVE run on the demo config (tiny model, generated data)."""
    args = [
        "--config", str(CONFIGS / "demo.yaml"),
        f"--data.init_args.root={data_root}",
        "--data.init_args.num_workers=0",
        "--data.init_args.batch_size=4",
        f"--run.root={run_root}",
        f"--run.name={name}",
        f"--trainer.max_epochs={epochs}",
        "--trainer.enable_progress_bar=false",
        "--run.test_after_fit=false",
    ]
    args += [f"--{k}={v}" for k, v in overrides.items()]
    return args
