"""Unsupervised metrics: NMI and ARI of the teacher's [CLS] argmax against the labels.

The reference logs these during pre-training (``evaluation/unsupervised/unsup_cls.eval_pred``,
sklearn's ``normalized_mutual_info_score`` and ``adjusted_rand_score``): the index of the
largest teacher [CLS] logit (one of K prototypes) is the cluster id of an image. Written here
with numpy on the contingency table, with sklearn's conventions:

* NMI = I(U; V) / mean(H(U), H(V)), the mean being arithmetic by default (sklearn ≥ 0.22; older
  sklearn used the geometric mean, ``average_method="geometric"``). Two single-cluster
  labellings give 1; otherwise a zero mutual information gives 0.
* ARI = (Σ_ij C(n_ij, 2) − E) / (½(Σ_i C(a_i, 2) + Σ_j C(b_j, 2)) − E) with
  E = Σ_i C(a_i, 2) · Σ_j C(b_j, 2) / C(n, 2) (Hubert & Arabie). When the denominator is 0 (both
  labellings trivial in the same way) the labellings agree and ARI = 1.
"""
from __future__ import annotations

import numpy as np

AVERAGE_METHODS = ("arithmetic", "geometric", "min", "max")


def contingency(labels_true, labels_pred) -> np.ndarray:
    """[n_classes, n_clusters] counts of (class, cluster) pairs."""
    t = np.asarray(labels_true).reshape(-1)
    p = np.asarray(labels_pred).reshape(-1)
    if t.shape != p.shape:
        raise ValueError(f"labels_true has {t.size} entries but labels_pred has {p.size}")
    if t.size == 0:
        raise ValueError("labels_true and labels_pred are empty")
    _, ti = np.unique(t, return_inverse=True)
    _, pi = np.unique(p, return_inverse=True)
    table = np.zeros((ti.max() + 1, pi.max() + 1), dtype=np.int64)
    np.add.at(table, (ti, pi), 1)
    return table


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def nmi(labels_true, labels_pred, average_method: str = "arithmetic") -> float:
    if average_method not in AVERAGE_METHODS:
        raise ValueError(f"average_method {average_method!r} is unknown; valid: "
                         f"{', '.join(AVERAGE_METHODS)}")
    c = contingency(labels_true, labels_pred).astype(np.float64)
    if c.shape[0] == 1 and c.shape[1] == 1:
        return 1.0
    n = c.sum()
    a, b = c.sum(1), c.sum(0)
    nz = c > 0
    # I = Σ p_ij log(p_ij / (p_i p_j)), over the non-empty cells
    mi = float((c[nz] / n * np.log(c[nz] * n / np.outer(a, b)[nz])).sum())
    if mi <= 0:
        return 0.0
    hu, hv = _entropy(a), _entropy(b)
    norm = {"arithmetic": (hu + hv) / 2, "geometric": np.sqrt(hu * hv), "min": min(hu, hv),
            "max": max(hu, hv)}[average_method]
    return float(min(mi / norm, 1.0)) if norm > 0 else 0.0


def ari(labels_true, labels_pred) -> float:
    c = contingency(labels_true, labels_pred).astype(np.float64)
    n = c.sum()

    def pairs(x):
        return (x * (x - 1) / 2).sum()

    sum_ij, sum_a, sum_b = pairs(c), pairs(c.sum(1)), pairs(c.sum(0))
    total = n * (n - 1) / 2
    expected = sum_a * sum_b / total if total > 0 else 0.0
    denom = (sum_a + sum_b) / 2 - expected
    if denom == 0:
        return 1.0
    return float((sum_ij - expected) / denom)


def cluster_metrics(labels_true, labels_pred) -> dict:
    return {"nmi": nmi(labels_true, labels_pred), "ari": ari(labels_true, labels_pred)}
