""":func:`fidelity`: k-NN precision and recall of generated against real images in a feature
space independent of G and D (:data:`FEATURE_SPACES`: the factor regressor's or a fixed
random CNN's)."""
from __future__ import annotations

from .factors import FactorEstimator
from .knn import RandomFeatures, knn_precision_recall


# name -> what the report says about it
FEATURE_SPACES = {
    "factor-regressor": "the factor regressor's penultimate layer (128 ReLU features of the 16x16-pooled "
                        "image; trained on procedural faces only, blur-tolerant by its augmentation)",
    "random-cnn": "a fixed random CNN (metrics.RandomFeatures: 3 conv+ReLU stages, 2,048 features; "
                  "never trained)",
}


def feature_extractor(space: str, res: int, log=None):
    """``images -> (N, d) features`` for a name of :data:`FEATURE_SPACES`."""
    if space == "factor-regressor":
        return FactorEstimator.load_or_train(res, log=log).features
    if space == "random-cnn":
        return RandomFeatures()
    raise ValueError(f"unknown feature space {space!r}: one of {', '.join(FEATURE_SPACES)}")


def fidelity(real, fake, features, k: int = 3, n: int | None = None) -> dict:
    """k-NN precision (samples inside the real images' manifold) and recall (real images
    inside the samples') of ``fake`` against ``real`` in the space ``features`` (a callable
    of :func:`feature_extractor`); the first ``n`` (default: the smaller set's size) of each."""
    n = min(len(real), len(fake)) if n is None else min(n, len(real), len(fake))
    p, r = knn_precision_recall(features(real[:n]).float(), features(fake[:n]).float(), k)
    return {"precision": p, "recall": r, "k": k, "n": n}
