"""Classification metrics for the defect class (label 1), as an inspection engineer reads them."""

from __future__ import annotations

import numpy as np


def binary_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    """Return accuracy, balanced accuracy, precision, recall, F1 and AUROC of the defect class.

    labels: (n,) 0 = ok, 1 = defect; scores: (n,) defect probability; a score >= threshold is a
    defect call. The confusion matrix is [[tn, fp], [fn, tp]]. `majority_accuracy` is the accuracy
    of always predicting the most frequent class.
    """
    labels = np.asarray(labels).astype(int)
    scores = np.asarray(scores, dtype=np.float64)
    predicted = (scores >= threshold).astype(int)

    tp = int(((predicted == 1) & (labels == 1)).sum())
    tn = int(((predicted == 0) & (labels == 0)).sum())
    fp = int(((predicted == 1) & (labels == 0)).sum())
    fn = int(((predicted == 0) & (labels == 1)).sum())
    positives, negatives = tp + fn, tn + fp

    recall = tp / positives if positives else 0.0
    specificity = tn / negatives if negatives else 0.0
    precision = tp / (tp + fp) if tp + fp else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "count": int(labels.size),
        "accuracy": (tp + tn) / labels.size if labels.size else 0.0,
        "balanced_accuracy": (recall + specificity) / 2,
        "precision": precision,
        "recall": recall,
        "specificity": specificity,
        "f1": f1,
        "auroc": auroc(labels, scores),
        "confusion": [[tn, fp], [fn, tp]],
        "majority_accuracy": max(positives, negatives) / labels.size if labels.size else 0.0,
        "threshold": float(threshold),
    }


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Return the area under the ROC curve by the rank-sum (Mann-Whitney U) formula, ties averaged."""
    labels = np.asarray(labels).astype(int)
    positives = int(labels.sum())
    negatives = labels.size - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(labels.size, dtype=np.float64)
    sorted_scores = np.asarray(scores)[order]
    start = 0
    while start < labels.size:
        end = start
        while end + 1 < labels.size and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    rank_sum = ranks[labels == 1].sum()
    return float((rank_sum - positives * (positives + 1) / 2) / (positives * negatives))


def best_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """Return the threshold with the highest balanced accuracy; ties go to the one nearest 0.5."""
    candidates = np.unique(np.concatenate([scores, [0.5]]))
    best, best_value = 0.5, -1.0
    for threshold in candidates:
        value = binary_metrics(labels, scores, float(threshold))["balanced_accuracy"]
        if value > best_value + 1e-12 or (abs(value - best_value) <= 1e-12 and abs(threshold - 0.5) < abs(best - 0.5)):
            best, best_value = float(threshold), value
    return best


def format_table(metrics: dict, title: str = "") -> str:
    """Render the metrics as a small plain-text table."""
    (tn, fp), (fn, tp) = metrics["confusion"]
    lines = [title] if title else []
    lines += [
        f"  samples            {metrics['count']}",
        f"  accuracy           {metrics['accuracy'] * 100:6.2f} %",
        f"  balanced accuracy  {metrics['balanced_accuracy'] * 100:6.2f} %",
        f"  precision (defect) {metrics['precision'] * 100:6.2f} %",
        f"  recall (defect)    {metrics['recall'] * 100:6.2f} %",
        f"  F1 (defect)        {metrics['f1'] * 100:6.2f} %",
        f"  AUROC              {metrics['auroc']:.4f}",
        f"  majority baseline  {metrics['majority_accuracy'] * 100:6.2f} %",
        f"  threshold          {metrics['threshold']:.4f}",
        "  confusion          predicted ok  predicted defect",
        f"    true ok          {tn:12d}  {fp:16d}",
        f"    true defect      {fn:12d}  {tp:16d}",
    ]
    return "\n".join(lines)
