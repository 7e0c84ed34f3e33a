"""Synthetic audio-visual feature pools with a controlled modality gap and mismatched (off-screen sound) pairs.

Used by the tests and ``bench/active_learning.py``. Each clip has a class ``y``; its visual feature is
``W_v (mu_y + noise) + gap * o_v`` and its audio feature ``W_a (mu_y' + noise) + gap * o_a`` with
``y' = y`` for matched pairs and a random other class for mismatched ones (the sound comes from off screen).
``o_a`` and ``o_v`` are fixed unit offsets, one per modality: the larger ``gap``, the further apart the two
modalities' centroids.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SyntheticPool:
    audio: np.ndarray  # (N, Ca) float32
    visual: np.ndarray  # (N, Cv) float32
    labels: np.ndarray  # (N,) int64: the class on screen
    mismatched: np.ndarray  # (N,) bool: the audio belongs to another class


def synthetic_pool(n: int, num_classes: int = 5, dim: int = 32, latent: int = 8, gap: float = 3.0,
                   mismatch_rate: float = 0.2, noise: float = 0.6, imbalance: float = 0.0,
                   seed: int = 0) -> SyntheticPool:
    """``n`` clips; ``imbalance`` > 0 makes class frequencies decay geometrically (``exp(-imbalance * c)``)."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(size=(num_classes, latent)) * 2.0
    w_a, w_v = rng.normal(size=(latent, dim)), rng.normal(size=(latent, dim))
    o_a, o_v = rng.normal(size=dim), rng.normal(size=dim)
    o_a, o_v = o_a / np.linalg.norm(o_a) * np.sqrt(dim), o_v / np.linalg.norm(o_v) * np.sqrt(dim)
    p = np.exp(-imbalance * np.arange(num_classes))
    labels = rng.choice(num_classes, size=n, p=p / p.sum())
    mismatched = rng.random(n) < mismatch_rate
    other = (labels + rng.integers(1, num_classes, size=n)) % num_classes
    audio_class = np.where(mismatched, other, labels)
    visual = (mu[labels] + noise * rng.normal(size=(n, latent))) @ w_v + gap * o_v
    audio = (mu[audio_class] + noise * rng.normal(size=(n, latent))) @ w_a + gap * o_a
    return SyntheticPool(audio.astype(np.float32), visual.astype(np.float32), labels.astype(np.int64), mismatched)
