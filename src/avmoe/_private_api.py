"""Every private or internal Lightning / transformers / torch API avmoe relies on, in one place, with the reason.

Nothing public does these jobs; each entry says why. ``tests/test_private_api.py`` checks each one against the
installed versions (names, signatures, behaviour) and fails with a message naming what changed, so a new
transformers or Lightning release breaks loudly there instead of silently shifting numbers. The versions tested
are the ``transformers`` / ``lightning`` ranges pinned in ``setup.cfg``.

This module imports neither Lightning nor transformers at import time (model code must not import Lightning;
data code should not pay for transformers): the transformers names are resolved on first use (PEP 562
``__getattr__``) and the Lightning helpers only touch attributes of objects they are given.

transformers (``models/backbones/swin.py``, ``models/backbones/htsat.py``):

- ``Swinv2Layer``, ``Swinv2Stage`` (``transformers.models.swinv2.modeling_swinv2``) and ``ClapAudioLayer``,
  ``ClapAudioStage`` (``transformers.models.clap.modeling_clap``): the per-block and per-stage modules. AVMoE
  interleaves adapters between the blocks of two encoders, so it must run blocks one at a time; the library exposes
  only whole-model forwards.
- ``window_partition`` / ``window_reverse`` (``modeling_swinv2``) and the ``Swinv2Layer`` methods ``maybe_pad`` and
  ``get_attn_mask``: the first half of a Swin-V2 block is re-stepped (attention without the MLP) so an adapter can
  sit between the two halves; calling the library's own helpers keeps the result bit-identical to
  ``Swinv2Layer.forward``.

torch (helper below):

- ``torch.ops.mkldnn._linear_pointwise`` (``onednn_linear``, used by ``models/backbones/gemm.py``): oneDNN's fp32
  linear, the kernel ``torch.compile`` emits for frozen CPU weights. Eager ``F.linear`` on a CPU always calls the
  BLAS ``sgemm``, which ran the frozen encoders' products up to 1.6x slower on the benchmark CPU; no public eager API
  reaches oneDNN's fp32 matmul (``torch.backends.mkldnn.matmul.fp32_precision`` only lowers the precision).
  Its erf-GELU post-op is used where no gradient is needed, for MLPs whose activation is transformers'
  ``GELUActivation`` around ``F.gelu`` (``is_exact_gelu`` reads ``GELUActivation.act``).

Lightning (helpers below):

- ``uses_distributed_sampler`` reads ``Trainer._accelerator_connector.use_distributed_sampler``
  (``datamodules/base.py``);
- ``cluster_environment`` falls back to ``Trainer._accelerator_connector.cluster_environment``
  (``callbacks/preemption.py``);
- ``drop_cached_train_loader`` clears ``FitLoop._combined_loader`` / ``_data_fetcher``
  (``callbacks/valuation.py``);
- overridden or read in ``avmoe/cli.py`` (not importable, so only listed here; names in ``LIGHTNING_CLI_INTERNALS``):
  ``LightningCLI._instantiate_trainer``, the only hook that sees the configured callbacks before the Trainer
  exists (adds the run-folder callbacks without duplicating those the user configured);
  ``LightningCLI._parse_ckpt_path``, where stock LightningCLI merges ``--ckpt_path``'s hyper-parameters over the
  command line (avmoe makes them defaults the user's flags override); ``LightningCLI._subcommand_parsers``, the
  per-subcommand parsers, to tell which model options the user gave.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

# name -> (module, reason): the transformers internals, imported on first use.
TRANSFORMERS_INTERNALS: dict[str, tuple[str, str]] = {
    "Swinv2Layer": ("transformers.models.swinv2.modeling_swinv2", "one Swin-V2 block, stepped between adapters"),
    "Swinv2Stage": ("transformers.models.swinv2.modeling_swinv2", "a Swin-V2 stage (its blocks + downsample)"),
    "window_partition": ("transformers.models.swinv2.modeling_swinv2", "the half-block re-step, bit-identical"),
    "window_reverse": ("transformers.models.swinv2.modeling_swinv2", "the half-block re-step, bit-identical"),
    "ClapAudioLayer": ("transformers.models.clap.modeling_clap", "one HTS-AT block, stepped between adapters"),
    "ClapAudioStage": ("transformers.models.clap.modeling_clap", "an HTS-AT stage (its blocks + downsample)"),
}
# Methods and attributes of those classes the backbone calls (checked by tests/test_private_api.py).
SWINV2_LAYER_MEMBERS = ("maybe_pad", "get_attn_mask", "window_size", "shift_size", "attention", "layernorm_before",
                        "layernorm_after", "drop_path", "intermediate", "output")
LIGHTNING_CLI_INTERNALS = ("_instantiate_trainer", "_parse_ckpt_path", "_subcommand_parsers")
CLAP_AUDIO_ENCODER_MEMBERS = ("batch_norm", "reshape_mel2img", "patch_embed", "input_resolutions", "layers", "norm")

# The library MLP submodules the fast path calls by attribute (Swinv2Intermediate / ClapAudioIntermediate, and the
# *Output classes): its frozen GEMMs run through ``models/backbones/gemm.py`` instead of the modules' ``forward``.
MLP_MEMBERS = {"intermediate": ("dense", "intermediate_act_fn"), "output": ("dense", "dropout")}

__all__ = ["CLAP_AUDIO_ENCODER_MEMBERS", "LIGHTNING_CLI_INTERNALS", "MLP_MEMBERS", "SWINV2_LAYER_MEMBERS",
           "TRANSFORMERS_INTERNALS", "cluster_environment", "drop_cached_train_loader", "is_exact_gelu",
           "onednn_linear", "uses_distributed_sampler", *TRANSFORMERS_INTERNALS]


def __getattr__(name: str) -> Any:
    if name in TRANSFORMERS_INTERNALS:
        module, _ = TRANSFORMERS_INTERNALS[name]
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value  # resolved once
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------------------------------- torch
def onednn_linear(x: Any, weight: Any, bias: Any, gelu: bool = False) -> Any:
    """``F.linear(x, weight, bias)`` (fp32, CPU) computed by oneDNN, followed by the exact (erf) GELU when
    ``gelu``; x (..., K), weight (N, K), possibly strided.

    Private: ``torch.ops.mkldnn._linear_pointwise(X, W, B, attr, scalars, algorithm)``, with no fused post-op
    (``attr="none"``) or the erf GELU (``attr="gelu"``, ``algorithm="none"``). It is the operator torch's compiler
    uses for frozen CPU linears (2.x); eager torch has no public route to oneDNN's fp32 matmul.
    """
    if gelu:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "none")
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def is_exact_gelu(act: Any) -> bool:
    """Whether a transformers activation module is ``F.gelu`` with its default erf form (``ACT2FN["gelu"]``).

    Internal: ``transformers.activations.GELUActivation.act``, the function its ``forward`` calls. The fast path
    fuses the activation into the oneDNN GEMM only when it is this one.
    """
    from transformers.activations import GELUActivation  # on first use: importing this module stays light

    return type(act) is GELUActivation and getattr(act, "act", None) is torch.nn.functional.gelu


# ------------------------------------------------------------------------------------------------- Lightning
def uses_distributed_sampler(trainer: Any) -> bool:
    """``Trainer(use_distributed_sampler=...)`` as given by the user (default True).

    Private: ``trainer._accelerator_connector.use_distributed_sampler``. Lightning 2.6 stores the flag only there;
    the DataModules shard with their own resumable sampler and must not shard when the user turned Lightning's off.
    """
    return bool(getattr(getattr(trainer, "_accelerator_connector", None), "use_distributed_sampler", True))


def cluster_environment(trainer: Any) -> Any:
    """The run's cluster environment (e.g. ``SLURMEnvironment``), or None.

    Private fallback: ``trainer._accelerator_connector.cluster_environment``. Single-device strategies carry none
    (``trainer.strategy.cluster_environment`` is None) and Lightning 2.6.6 has no public accessor for it.
    """
    env = getattr(getattr(trainer, "strategy", None), "cluster_environment", None)
    if env is None:
        env = getattr(getattr(trainer, "_accelerator_connector", None), "cluster_environment", None)
    return env


def drop_cached_train_loader(fit_loop: Any) -> bool:
    """Make ``fit_loop`` rebuild the train DataLoader at the next epoch start; False when this Lightning has no
    such cache (the caller then asks for ``reload_dataloaders_every_n_epochs=1``).

    Private: ``FitLoop._combined_loader`` and ``FitLoop._data_fetcher``. Lightning 2.6 rebuilds the loader in
    ``FitLoop.setup_data`` only when it holds none (or every n epochs with ``reload_dataloaders_every_n_epochs``);
    dropping the cached one is the only way to get a one-off rebuild (a re-sampled train plan).
    """
    if not hasattr(fit_loop, "_combined_loader"):
        return False
    if getattr(fit_loop, "_data_fetcher", None) is not None:
        fit_loop._data_fetcher.teardown()
        fit_loop._data_fetcher = None
    fit_loop._combined_loader = None
    return True
