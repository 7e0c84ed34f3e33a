"""Lightning callbacks: balancing methods, run-folder helpers, progress and visualisation."""

from avmoe.callbacks._distributed import ParameterChecksum
from avmoe.callbacks.avs_visual import AVSMaskImages
from avmoe.callbacks.crmt import CRMT
from avmoe.callbacks.figures import AVESegments, AVVPTimelines, FeatureEmbeddings
from avmoe.callbacks.checkpointing import LatestCheckpoint, latest_checkpoint
from avmoe.callbacks.metrics_json import MetricsJSON
from avmoe.callbacks.mmpareto import MMPareto, mmpareto_combine
from avmoe.callbacks.ogm import OGM, OGMGE, ogm_coefficients
from avmoe.callbacks.opm import OPM, opm_drop_probabilities
from avmoe.callbacks.parameters import ParameterSummary, parameter_breakdown
from avmoe.callbacks.preemption import Preemption
from avmoe.callbacks.relearning import Relearning, kmeans_purity, relearning_strength, soft_reinit_
from avmoe.callbacks.progress import LineProgressBar, default_progress_bar
from avmoe.callbacks.robustness import RobustEval
from avmoe.callbacks.router_usage import RouterUsage, router_statistics
from avmoe.callbacks.seeding import StepSeeding
from avmoe.callbacks.tf32 import TF32Matmul
from avmoe.callbacks.valuation import ModalityValuation, shapley_contributions

__all__ = [
    "AVESegments",
    "AVSMaskImages",
    "CRMT",
    "AVVPTimelines",
    "FeatureEmbeddings",
    "LatestCheckpoint",
    "LineProgressBar",
    "MMPareto",
    "MetricsJSON",
    "ModalityValuation",
    "OGM",
    "OGMGE",
    "OPM",
    "ParameterChecksum",
    "ParameterSummary",
    "Preemption",
    "RobustEval",
    "RouterUsage",
    "Relearning",
    "StepSeeding",
    "TF32Matmul",
    "default_progress_bar",
    "kmeans_purity",
    "latest_checkpoint",
    "mmpareto_combine",
    "ogm_coefficients",
    "opm_drop_probabilities",
    "parameter_breakdown",
    "router_statistics",
    "relearning_strength",
    "shapley_contributions",
    "soft_reinit_",
]
