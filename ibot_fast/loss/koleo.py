"""KoLeo: a nearest-neighbour spreading term (Sablayrolles et al., ICLR 2019; DINOv2's
``koleo_loss_weight``). Not part of iBOT: ``--koleo_weight`` (default 0, the reference's loss)
adds it on the student's global-crop [CLS] bottleneck vectors.

For unit vectors x_1..x_n (one crop view of a batch),

    koleo(x) = -1/n · Σ_i log(‖x_i − x_nn(i)‖ + eps),   nn(i) = argmax_{j≠i} <x_i, x_j>

so the term falls as each vector's nearest neighbour moves away: it pushes a batch's vectors
apart on the sphere. It is what keeps the small demo's [CLS] head from collapsing (README,
"Demo result"): when the teacher's [CLS] vectors of different images are alike, its centred
targets are the same near-uniform distribution for every image and nothing tells the student
images apart; spreading the vectors gives each image its own target.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

KOLEO_EPS = 1e-8  # DINOv2's: guards log(0) and the normalisation of a zero vector


def koleo_loss(x: torch.Tensor, eps: float = KOLEO_EPS) -> torch.Tensor:
    """KoLeo of the rows of ``x`` [n, d] (normalised here), a 0-dim tensor. Needs n ≥ 2.

    The nearest neighbour is chosen without gradient (an argmax); the distance to it carries
    the gradient, as in DINOv2's KoLeoLoss."""
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"koleo_loss needs [n >= 2, d] rows, got {tuple(x.shape)}")
    x = F.normalize(x, dim=-1, eps=eps)
    with torch.no_grad():
        sim = x @ x.T
        sim.fill_diagonal_(-2.0)  # below any cosine: a row is never its own neighbour
        nearest = sim.argmax(dim=1)
    dist = F.pairwise_distance(x, x[nearest], eps=eps)
    return -torch.log(dist + eps).mean()


def koleo_views(z_cls: torch.Tensor, n_views: int) -> torch.Tensor:
    """The term on a step's global [CLS] vectors ``z_cls`` [n_views·B, d] (view-major, as the
    crops are batched): KoLeo within each view's B rows, summed over the views (DINOv2 sums
    over its two global views)."""
    if z_cls.shape[0] % n_views:
        raise ValueError(f"{z_cls.shape[0]} [CLS] rows do not split into {n_views} views")
    return sum(koleo_loss(v) for v in z_cls.chunk(n_views))


__all__ = ["KOLEO_EPS", "koleo_loss", "koleo_views"]
