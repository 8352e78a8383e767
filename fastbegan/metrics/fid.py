"""FID and IS through torch-fidelity (optional; not a dependency), with local Inception weights only."""
from __future__ import annotations

from pathlib import Path


# --------------------------------------------------------------------------- FID / IS (optional)

def fid_backend(weights: str):
    """The ``torch_fidelity`` module, after checking that ``weights`` (a local Inception
    file) exists; a clear error otherwise. Called before any work by ``fastbegan eval``."""
    if not Path(weights).is_file():
        raise ValueError(f"--fid-weights {weights!r} does not exist: pass the path of a local "
                         "Inception weights file (fastbegan never downloads it)")
    try:
        import torch_fidelity
    except ImportError:
        raise RuntimeError("FID/IS need torch-fidelity, which is not installed: `pip install "
                           "torch-fidelity` (fastbegan does not depend on it)") from None
    return torch_fidelity


def fid_is(real_dir: str, fake_dir: str, weights: str, cuda: bool = False) -> dict:
    """FID and IS through torch-fidelity with *local* Inception weights (never downloaded).

    ``weights``: the torch-fidelity / pytorch-fid Inception file
    (e.g. ``weights-inception-2015-12-05-6726825d.pth``). Raises RuntimeError with the
    fix if torch-fidelity is not installed, ValueError if the file is missing.
    """
    torch_fidelity = fid_backend(weights)
    m = torch_fidelity.calculate_metrics(
        input1=str(fake_dir), input2=str(real_dir), fid=True, isc=True, cuda=cuda, verbose=False,
        cache=False, feature_extractor="inception-v3-compat",
        feature_extractor_weights_path=str(weights))
    return {"fid": float(m["frechet_inception_distance"]), "is_mean": float(m["inception_score_mean"]),
            "is_std": float(m["inception_score_std"])}
