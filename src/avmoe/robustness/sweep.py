"""Sweep of robustness settings: expansion of the configured series and the result table.

A sweep is a list of :class:`SweepItem` series; each series varies one field of a base :class:`EvalSetting`
(``severity``, ``attack_eps``, ``missing_rate``, ...) over ``values``. The table (``metrics/robustness.json``) has
the clean row and one row per (series, value) with the task's metrics and the relative drop
``(clean - value) / clean`` of every metric, plus per series the mean over its values (the mCE-style average of
ImageNet-C over severities).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Optional

from avmoe.robustness.setting import EvalSetting, as_setting

VARIABLE = tuple(f.name for f in fields(EvalSetting))


@dataclass
class SweepItem:
    """One series of a sweep: ``setting`` with ``vary`` set to each of ``values`` (or ``setting`` once)."""

    name: str
    """Series name (the figure's curve, the rows' ``name``)."""
    setting: EvalSetting = field(default_factory=EvalSetting)
    """The base setting of the series."""
    vary: Optional[str] = None
    """Field of the setting that the series varies (e.g. severity, attack_eps, missing_rate); None: one row."""
    values: list[float] = field(default_factory=list)
    """Values of ``vary``, in order (the figure's x axis)."""

    def __post_init__(self) -> None:
        self.setting = as_setting(self.setting) or EvalSetting()
        if self.vary is not None and self.vary not in VARIABLE:
            raise ValueError(f"sweep {self.name!r}: vary={self.vary!r} is not a setting field ({', '.join(VARIABLE)})")
        if self.vary is not None and not self.values:
            raise ValueError(f"sweep {self.name!r}: vary={self.vary!r} needs values")

    def settings(self) -> list[tuple[Optional[float], EvalSetting]]:
        """``(value, setting)`` per row; the value is None for a single-row series."""
        if self.vary is None:
            return [(None, self.setting)]
        cast = int if self.vary in ("severity", "attack_steps", "seed") else float
        return [(v, replace(self.setting, **{self.vary: cast(v)})) for v in self.values]


def as_items(value: Any) -> list[SweepItem]:
    return [v if isinstance(v, SweepItem) else SweepItem(**dict(v)) for v in (value or [])]


def relative_drop(clean: float, value: float) -> Optional[float]:
    """``(clean - value) / clean`` (None when clean is 0)."""
    return None if clean == 0 else (clean - value) / clean


def result_row(name: str, vary: Optional[str], value: Optional[float], setting: Optional[EvalSetting],
               metrics: dict[str, float], clean: dict[str, float]) -> dict[str, Any]:
    drops = {k: relative_drop(clean[k], v) for k, v in metrics.items() if k in clean}
    return {"name": name, "vary": vary, "value": value, "setting": setting.describe() if setting else {},
            "metrics": metrics, "relative_drop": drops}


def series_means(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per series (rows after the clean one), the mean of each metric over its rows."""
    out: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(r["name"] for r in rows[1:]):
        group = [r["metrics"] for r in rows[1:] if r["name"] == name]
        keys = set.intersection(*(set(g) for g in group))
        out[name] = {k: sum(g[k] for g in group) / len(group) for k in sorted(keys)}
    return out


def robustness_table(rows: list[dict[str, Any]], task: str) -> dict[str, Any]:
    """The JSON payload: task, rows (clean first), per-series means and how drops are defined."""
    return {"task": task, "relative_drop": "(clean - value) / clean", "rows": rows,
            "series_mean": series_means(rows)}


@dataclass
class RobustnessConfig:
    """The CLI's ``robustness`` group (``lightning_configs/robustness/*.yaml``)."""

    setting: Optional[EvalSetting] = None
    """Condition of ``validate`` / ``test`` / ``predict`` runs (None: clean)."""
    sweep: list[SweepItem] = field(default_factory=list)
    """``test`` only: after the clean test, re-test per setting of these series and write
    ``metrics/robustness.json`` and the TensorBoard curves."""

    def __post_init__(self) -> None:
        self.setting = as_setting(self.setting)
        self.sweep = as_items(self.sweep)
        if self.sweep and self.setting is not None and not self.setting.is_clean:
            raise ValueError("robustness.sweep measures drops from the clean test: leave robustness.setting unset")

    @property
    def attacks(self) -> bool:
        """Whether any setting attacks (the Trainer then needs ``inference_mode=False``)."""
        settings = [self.setting] + [s for item in self.sweep for _, s in item.settings()]
        return any(s is not None and s.attack != "none" for s in settings)

    @property
    def active(self) -> bool:
        return self.setting is not None or bool(self.sweep)


def as_robustness(value: Any) -> RobustnessConfig:
    if isinstance(value, RobustnessConfig):
        return value
    if value is None:
        return RobustnessConfig()
    return RobustnessConfig(**{k: v for k, v in dict(value).items() if k in ("setting", "sweep")})
