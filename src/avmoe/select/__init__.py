"""Cold-start active learning: which unlabelled audio-visual clips to annotate first (``lightning select``).

Baselines (:mod:`.baselines`), MMCSAL stage 1 (:mod:`.stage1`) and stage 2 (:mod:`.mmcsal`), pooled backbone
features (:mod:`.features`), split-file writers (:mod:`.splits`) and the command (:mod:`.command`).
See docs/active_learning.md for what follows the paper and what is a reconstruction.
"""
