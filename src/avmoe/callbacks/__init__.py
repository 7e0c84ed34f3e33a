"""Lightning callbacks: balancing methods, run-folder helpers, progress and visualisation."""

from avmoe.callbacks.metrics_json import MetricsJSON
from avmoe.callbacks.progress import LineProgressBar, default_progress_bar

__all__ = ["LineProgressBar", "MetricsJSON", "default_progress_bar"]
