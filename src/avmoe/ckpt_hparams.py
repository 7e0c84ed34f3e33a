"""``--ckpt_path`` with ``test`` / ``validate`` / ``predict``: the checkpoint's hyper-parameters as *defaults*.

A checkpoint stores the init arguments the model was trained with, so ``lightning test --ckpt_path best.ckpt``
rebuilds the trained architecture without repeating every option. Stock LightningCLI merges them *over* the
parsed config, which silently discards what the user asked for (an eval switch such as
``--model.init_args.visual_only_eval true``, a moved weights folder ``...visual.pretrained NEWPATH``). Here the
order is: class defaults < checkpoint hyper-parameters < what the user gave (config files, flags, environment).
"""

from __future__ import annotations

import copy
from typing import Any, Iterator


def _plain(value: Any) -> Any:
    """Namespaces / tuples -> dicts / lists, so values from the parser and from a checkpoint compare equal."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def flatten(tree: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Leaves of a nested dict as (``dotted.key``, value)."""
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from flatten(value, f"{name}.")
        else:
            yield name, value


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def merge_hparams(hparams: dict[str, Any], given: Any) -> tuple[dict[str, Any], list[tuple[str, Any, Any]]]:
    """Init arguments = checkpoint ``hparams`` with the user-``given`` init arguments on top.

    Returns the merged init arguments and the overrides: ``(dotted key, checkpoint value, given value)`` for every
    given leaf whose value differs from the checkpoint's.
    """
    hparams, given = _plain(hparams) or {}, _plain(given) or {}
    stored = dict(flatten(hparams))
    overrides = [(k, stored[k], v) for k, v in flatten(given) if k in stored and stored[k] != v]
    return _deep_merge(hparams, given), overrides


def describe_overrides(ckpt_path: str, overrides: list[tuple[str, Any, Any]]) -> str:
    """One line per override, for the log."""
    lines = [f"{len(overrides)} hyper-parameter(s) of {ckpt_path} overridden by the config / command line:"]
    lines += [f"  model.init_args.{k}: {old!r} (checkpoint) -> {new!r}" for k, old, new in overrides]
    return "\n".join(lines)
