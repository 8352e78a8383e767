"""Sample quality without pretrained weights (docs/design.md §7, docs/evaluation.md).

- :func:`swd` (:mod:`.pyramid`): sliced Wasserstein distance on Laplacian-pyramid patches
  (Karras et al. 2018), per level (x1e3, finest first) and their mean.
- :class:`FactorEstimator` and :func:`factor_score` (:mod:`.factors`): on the embedded
  procedural faces, a small CNN estimates the 8 known factors of generated and real
  images; per-factor coverage and W1, precision/recall in factor space, render fidelity.
- :func:`fidelity` (:mod:`.features`, :mod:`.knn`): k-NN precision (fidelity) and recall
  (variety) of generated against real images (Kynkaenniemi et al. 2019) in a feature space
  independent of G and D (:data:`FEATURE_SPACES`: the factor regressor's or a fixed random
  CNN's).
- :func:`fid_is` (:mod:`.fid`): FID and IS through torch-fidelity, with local Inception
  weights only.

Images everywhere: (N, H, W, 3) uint8 numpy arrays or (N, 3, H, W) float tensors in
[-1, 1] (a generator's output).
"""
from .factors import (CIRCULAR_FACTORS, FactorEstimator, FactorNet, compare_factors, decile_coverage,
                      factor_score, precision_recall, render_errors, wasserstein_1d)
from .features import FEATURE_SPACES, feature_extractor, fidelity
from .fid import fid_backend, fid_is
from .inputs import as_float_images
from .knn import RandomFeatures, knn_precision_recall
from .pyramid import (SWDResult, laplacian_pyramid, pyr_down, pyr_up, pyramid_resolutions, sliced_wasserstein,
                      swd)

__all__ = ["CIRCULAR_FACTORS", "FactorEstimator", "FactorNet", "compare_factors", "decile_coverage",
           "factor_score", "precision_recall", "render_errors", "wasserstein_1d", "FEATURE_SPACES",
           "feature_extractor", "fidelity", "fid_backend", "fid_is", "as_float_images", "RandomFeatures",
           "knn_precision_recall", "SWDResult", "laplacian_pyramid", "pyr_down", "pyr_up",
           "pyramid_resolutions", "sliced_wasserstein", "swd"]
