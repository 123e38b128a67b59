"""DeViSE's linear visual-semantic map and ConSE's convex combination of label vectors.

DeViSE (Frome et al. 2013, "DeViSE: A Deep Visual-Semantic Embedding Model", NIPS, sec. 3.3):
the softmax of a pretrained ImageNet CNN is replaced by a linear transformation M that
projects the CNN's penultimate representation into the word-vector space, "the output of
the visual model is projected by a linear transformation M into the word space"; an image
is then labelled by the label vectors nearest (by cosine similarity) to M v(image). Here the
visual model is EfficientNet-Lite0 and v(image) its 1280-d pooled features
(:meth:`training.nets.efficientnet_lite.EfficientNetLite0.features`); the word space is the
384-d all-MiniLM-L6-v2 noun vectors.

ConSE (Norouzi et al. 2014, "Zero-Shot Learning by Convex Combination of Semantic
Embeddings", ICLR, eq. 1-2) needs no training at all: the image's embedding is

    f(x) = 1/Z * sum_{t=1..T} p(y_t | x) * s(y_t),    Z = sum_{t=1..T} p(y_t | x)

over the classifier's T most probable labels y_1..y_T with word vectors s(y_t).

Inference-safe: torch only (no trainer code, no numpy).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from training.nets import register

#: EfficientNet-Lite0's pooled feature width and the MiniLM word-space width.
DEFAULT_IN_FEATURES = 1280
DEFAULT_OUT_FEATURES = 384
_EPS = 1e-12


class DeViSEMap(nn.Module):
    """M: visual features (N, in_features) -> unit word-space vectors (N, out_features).

    One ``nn.Linear`` (weights and a bias), then L2 normalisation, so that a dot product
    with unit label vectors is the cosine similarity DeViSE ranks labels by (sec. 3.3). The
    hinge rank loss is computed on the normalised outputs (:mod:`training.train_devise`).
    """

    def __init__(self, in_features: int = DEFAULT_IN_FEATURES,
                 out_features: int = DEFAULT_OUT_FEATURES, bias: bool = True) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"feature sizes must be positive, got {in_features} -> "
                             f"{out_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.linear = nn.Linear(in_features, out_features, bias=bias)

    def project(self, features: Tensor) -> Tensor:
        """M v: the raw projection, (N, out_features), not normalised."""
        if features.dim() != 2 or features.shape[1] != self.in_features:
            raise ValueError(f"expected features of shape (N, {self.in_features}), got "
                             f"{tuple(features.shape)}")
        return self.linear(features.to(self.linear.weight.dtype))

    def forward(self, features: Tensor) -> Tensor:
        """Unit-normalised word-space vectors, (N, out_features)."""
        return F.normalize(self.project(features), dim=1, eps=_EPS)


@register("devise-linear")
def devise_linear(in_features: int = DEFAULT_IN_FEATURES,
                  out_features: int = DEFAULT_OUT_FEATURES, bias: bool = True) -> DeViSEMap:
    """``{"type": "devise-linear", "in_features": 1280, "out_features": 384}``."""
    return DeViSEMap(in_features, out_features, bias=bias)


def conse_embed(probabilities: Tensor, class_vectors: Tensor, top_t: int) -> Tensor:
    """ConSE (Norouzi et al. 2014, eq. 1-2): per row, the convex combination of the word
    vectors of the ``top_t`` most probable classes, weighted by their probabilities
    renormalised to sum to 1, then L2-normalised (only the direction matters for the
    cosine nearest-neighbour search).

    ``probabilities``: (N, C) non-negative (softmax outputs; masked classes set to 0 are
    never chosen while another class has weight); ``class_vectors``: (C, D). Returns (N, D).
    Ties in probability are broken by the lower class index. A row whose top-T
    probabilities are all zero gets the plain mean of those T vectors.
    """
    if probabilities.dim() != 2 or class_vectors.dim() != 2:
        raise ValueError("probabilities must be (N, C) and class_vectors (C, D)")
    classes = probabilities.shape[1]
    if class_vectors.shape[0] != classes:
        raise ValueError(f"{classes} class probabilities but {class_vectors.shape[0]} "
                         "class vectors")
    if not 1 <= top_t <= classes:
        raise ValueError(f"top_t must lie in [1, {classes}], got {top_t}")
    if bool((probabilities < 0).any()):
        raise ValueError("probabilities must be non-negative")
    probs = probabilities.to(class_vectors.dtype)
    ordered = torch.sort(probs, dim=1, descending=True, stable=True)  # ties: lower index
    weights, indices = ordered.values[:, :top_t], ordered.indices[:, :top_t]
    total = weights.sum(dim=1, keepdim=True)
    uniform = torch.full_like(weights, 1.0 / top_t)
    weights = torch.where(total > 0, weights / total.clamp_min(_EPS), uniform)
    combined = torch.einsum("nt,ntd->nd", weights, class_vectors[indices])
    return F.normalize(combined, dim=1, eps=_EPS)
