"""AVSBench segmentation metrics: the official Jaccard index M_J and F-measure M_F.

Plain functions (OpenNLPLab/AVSBench ``avs_scripts/avs_s4/utils/utility.py``),
with the official *per-call* semantics on mask logits and binary targets of shape (N, H, W):

- :func:`avs_mask_iou` (``mask_iou``): pixels with ``sigmoid(logit) > 0.5`` (strict) are foreground; per frame
  ``inter / (union + 1e-7)``; a frame with an empty ground truth scores its true-negative pixels over ``H * W``;
  the result is the mean over the N frames of the call.
- :func:`avs_f_measure` (``Eval_Fmeasure``): beta^2 = 0.3 at 255 thresholds ``linspace(0, 1 - 1e-10, 255)``
  (float32, so the last one is 1.0) on ``sigmoid(logit) >= th``; frames with an empty ground truth are skipped;
  the F curves of the other frames are averaged (accumulated in frame order, float32, as the official loop) and
  the maximum over thresholds is returned; 0.0 when every frame of the call is empty.

Both numbers therefore depend on how frames are grouped into calls. :class:`AVSMetric` reports two aggregations:

- **official** (``mj``, ``mf``): clips are grouped into batches of ``clips_per_batch`` (4, the ``--test_batch_size``
  of the official ``test.sh``) *by sample index* (clip ``i`` is in batch ``i // 4``, i.e. dataset order with a
  smaller last batch), each batch is one call of the functions above over the annotated frames of its clips, and
  the batch values are averaged (``pyutils.AverageMeter``). Because grouping uses the sample index, not the
  DataLoader batch, the result does not depend on the loader's batch size or on the number of DDP processes
  (each clip counts once; :class:`~avmoe.metrics.base.PerSampleMetric` removes DDP padding).
- **per frame** (``mj_frame``, ``mf_frame``): the mean IoU over all annotated frames, and the maximum over
  thresholds of the mean F curve over all annotated frames with a non-empty ground truth (one call over the
  whole split). Independent of any batching.

The F curves are computed exactly (integer pixel counts per threshold via ``searchsorted`` + histogram, then the
official float32 formula) without materialising the 255 binarised masks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from avmoe.metrics.base import PerSampleMetric

BETA2 = 0.3
NUM_THRESHOLDS = 255
IOU_EPS = 1e-7
OFFICIAL_CLIPS_PER_BATCH = 4


def _check(logits: Tensor, target: Tensor) -> None:
    if logits.dim() != 3 or logits.shape != target.shape:
        raise ValueError(f"expected logits and target of the same shape (N, H, W), got {tuple(logits.shape)} "
                         f"and {tuple(target.shape)}")


def frame_iou(logits: Tensor, target: Tensor, eps: float = IOU_EPS) -> Tensor:
    """Per-frame official IoU (N,) float32 (see the module docstring). logits, target (N, H, W)."""
    _check(logits, target)
    target = target.float()
    pred = (torch.sigmoid(logits.float()) > 0.5).float()  # strict: logit 0 -> background
    inter = (pred * target).sum((1, 2))
    union = torch.maximum(pred, target).sum((1, 2))
    empty = target.sum((1, 2)) == 0
    true_neg = ((1 - target) * (1 - pred)).sum((1, 2))
    inter = torch.where(empty, true_neg, inter)
    union = torch.where(empty, torch.full_like(union, target.shape[-1] * target.shape[-2]), union)
    return inter / (union + eps)


def thresholds(num: int = NUM_THRESHOLDS, device: torch.device | None = None) -> Tensor:
    """The official threshold list ``linspace(0, 1 - 1e-10, num)`` in float32 (its last entry rounds to 1.0)."""
    return torch.linspace(0, 1 - 1e-10, num, device=device)


def frame_f_curves(logits: Tensor, target: Tensor, num: int = NUM_THRESHOLDS, beta2: float = BETA2) -> Tensor:
    """Per-frame F-measure curves (N, num) float32 at the official thresholds (NaN set to 0).

    Empty-ground-truth frames get a curve too (all zeros); callers skip them as the official code does.
    """
    _check(logits, target)
    n = logits.shape[0]
    prob = torch.sigmoid(logits.float()).reshape(n, -1)  # (N, P)
    gt = target.reshape(n, -1).double()
    th = thresholds(num, prob.device)
    # Pixel p passes threshold k (p >= th_k) iff k < j, j = number of thresholds <= p.
    j = torch.searchsorted(th, prob.contiguous(), right=True)  # (N, P) in [0, num]
    bins = (j + (num + 1) * torch.arange(n, device=prob.device)[:, None]).reshape(-1)  # one histogram per frame
    size = n * (num + 1)
    hist_all = torch.bincount(bins, minlength=size).double().view(n, num + 1)
    hist_tp = torch.bincount(bins, weights=gt.reshape(-1), minlength=size).view(n, num + 1)
    # count_k = sum_{j > k} hist[j]: reverse cumulative sum, dropping j = 0. Integer-valued, so exact in float32.
    positive = hist_all.flip(-1).cumsum(-1).flip(-1)[:, 1:].float()  # (N, num) sum of bin_k
    tp = hist_tp.flip(-1).cumsum(-1).flip(-1)[:, 1:].float()  # (N, num) TP_k
    gt_sum = gt.sum(1, keepdim=True).float()  # (N, 1)
    prec = tp / (positive + 1e-20)
    recall = tp / (gt_sum + 1e-20)
    f = (1 + beta2) * prec * recall / (beta2 * prec + recall)  # the official float32 expression
    return torch.where(torch.isnan(f), torch.zeros_like(f), f)  # 0/0 (no TP) -> 0, as the official NaN fix


def nonempty_frames(target: Tensor) -> Tensor:
    """(N,) bool: frames whose ground truth has a foreground pixel (``mean(gt) != 0`` in the official code)."""
    return target.reshape(target.shape[0], -1).float().sum(1) != 0


def mean_f_max(curves: Tensor, nonempty: Tensor) -> float:
    """Max over thresholds of the F curves averaged over the non-empty frames, accumulated in frame order in
    float32 as the official loop; 0.0 when there is none."""
    kept = curves[nonempty]
    if kept.shape[0] == 0:
        return 0.0
    total = torch.zeros_like(kept[0])
    for row in kept:  # sequential float32 sum: bit-identical to the official running average
        total = total + row
    return (total / kept.shape[0]).max().item()


def avs_mask_iou(logits: Tensor, target: Tensor) -> float:
    """The official AVSBench Jaccard index of one call (``mask_iou``).

    Args:
        logits: (N, H, W) mask logits.
        target: (N, H, W) binary ground truth {0, 1}.

    Returns:
        The mean over the N frames of the per-frame IoU at ``sigmoid > 0.5``; an empty ground truth scores its
        true-negative pixels over ``H * W``.
    """
    return (frame_iou(logits, target).sum() / logits.shape[0]).item()


def avs_f_measure(logits: Tensor, target: Tensor) -> float:
    """The official AVSBench F-measure of one call (``Eval_Fmeasure``, beta^2 = 0.3, 255 thresholds).

    Args:
        logits: (N, H, W) mask logits.
        target: (N, H, W) binary ground truth {0, 1}.

    Returns:
        Max over thresholds of the F curve averaged over frames with a non-empty ground truth; 0.0 when all are
        empty.
    """
    return mean_f_max(frame_f_curves(logits, target), nonempty_frames(target))


class AVSMetric(PerSampleMetric):
    """M_J and M_F over a split with the official batch-of-4 aggregation and a per-frame one.

    ``update(index (B,), logits (B, T, H, W), target (B, T, H, W), valid (B, T) bool)``: frames with
    ``valid = False`` (unannotated, e.g. S4 train frames 2-5) are ignored. Per clip it stores the frame IoUs,
    the frame F curves and two flags per frame (annotated, non-empty). ``compute()`` returns ``mj``, ``mf``
    (official aggregation), ``mj_frame``, ``mf_frame`` (per-frame aggregation); see the module docstring.

    Args:
        clips_per_batch: clips per official call (4 as the official ``test.sh``).
        num_thresholds: F-measure thresholds (255 official).
    """

    def __init__(self, clips_per_batch: int = OFFICIAL_CLIPS_PER_BATCH, num_thresholds: int = NUM_THRESHOLDS,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        if clips_per_batch < 1:
            raise ValueError(f"clips_per_batch must be >= 1, got {clips_per_batch}")
        self.clips_per_batch = clips_per_batch
        self.num_thresholds = num_thresholds
        self.add_state("clip_category", default=[], dist_reduce_fx="cat")  # (clip index, category id) rows

    def update(self, index: Tensor, logits: Tensor, target: Tensor, valid: Tensor,  # type: ignore[override]
               category: Tensor | None = None) -> None:
        """``category`` (B,) int (optional): the clips' categories, for the per-category :meth:`details`."""
        if category is not None:
            self.clip_category.append(torch.stack([index.long().view(-1), category.long().view(-1)], dim=-1))
        b, t = logits.shape[:2]
        flat_logits, flat_target = logits.reshape(b * t, *logits.shape[2:]), target.reshape(b * t, *target.shape[2:])
        iou = frame_iou(flat_logits, flat_target).view(b, t, 1)
        curves = frame_f_curves(flat_logits, flat_target, self.num_thresholds).view(b, t, -1)
        flags = torch.stack([valid.reshape(b, t).float(), nonempty_frames(flat_target).view(b, t).float()], -1)
        super().update(index, torch.cat([flags, iou, curves], dim=-1))  # (B, T, 3 + num)

    def details(self) -> dict[str, dict[int, float]]:
        """``per_category_mj`` / ``per_category_mf`` {category id: value} over the annotated frames of each
        category's clips (per-frame aggregation: the official batch-of-4 grouping mixes categories)."""
        pairs = self.clip_category if isinstance(self.clip_category, Tensor) else (
            torch.cat(self.clip_category) if self.clip_category else None)
        clip, nonempty, iou, curves = self._frames()
        if pairs is None or clip.numel() == 0:
            return {}
        lookup = dict(zip(pairs[:, 0].tolist(), pairs[:, 1].tolist()))  # duplicates (DDP padding) agree
        frame_category = torch.tensor([lookup.get(c, -1) for c in clip.tolist()], device=clip.device)
        mj, mf = {}, {}
        for c in sorted(set(frame_category.tolist()) - {-1}):
            sel = frame_category == c
            mj[c] = float(iou[sel].mean())
            mf[c] = _global_f_max(curves[sel], nonempty[sel])
        return {"per_category_mj": mj, "per_category_mf": mf}

    def _frames(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per annotated frame, in (clip index, time) order: clip index, non-empty flag, IoU, F curve."""
        index, values = self.rows()
        k = 3 + self.num_thresholds
        if index.numel() == 0:
            empty = torch.zeros(0, device=values.device)
            return index, empty.bool(), empty, empty.view(0, self.num_thresholds)
        values = values.reshape(index.numel(), -1, k)  # (clips, T, k)
        valid = values[..., 0] > 0.5  # (clips, T)
        clip = index[:, None].expand(-1, values.shape[1])[valid]
        rows = values[valid]  # (frames, k)
        return clip, rows[:, 1] > 0.5, rows[:, 2], rows[:, 3:]

    def compute(self) -> dict[str, Tensor]:
        clip, nonempty, iou, curves = self._frames()
        device = iou.device
        if clip.numel() == 0:
            zero = torch.tensor(0.0, device=device)
            return {"mj": zero, "mf": zero, "mj_frame": zero, "mf_frame": zero}
        group = torch.div(clip, self.clips_per_batch, rounding_mode="floor")
        mj_batches, mf_batches = [], []
        for g in torch.unique(group).tolist():
            sel = group == g
            mj_batches.append((iou[sel].sum() / sel.sum()).item())
            mf_batches.append(mean_f_max(curves[sel], nonempty[sel]))
        return {
            "mj": torch.tensor(sum(mj_batches) / len(mj_batches), device=device),
            "mf": torch.tensor(sum(mf_batches) / len(mf_batches), device=device),
            "mj_frame": iou.mean(),
            "mf_frame": torch.tensor(_global_f_max(curves, nonempty), device=device),
        }


def _global_f_max(curves: Tensor, nonempty: Tensor) -> float:
    """Per-frame aggregation of M_F: one mean curve over every non-empty annotated frame (float64 sum)."""
    kept = curves[nonempty]
    if kept.shape[0] == 0:
        return 0.0
    return kept.double().mean(0).max().item()
