"""Which feature space k-NN precision/recall should use: known degradations of real images,
scored against held-out real images in each candidate space (issue 25).

A fidelity measure must give real images ~0.9 and fall for images that are not on the
data: blurred, noisy, in-between (the mean of two real images: what a blurry generator
draws), shifted. Recall must fall for few modes (one kind of digit, 16 faces repeated). Spaces: pixels (average-pooled to
8x8, grey for the digits), the factor regressor's penultimate layer and its factor
estimates (faces only), and the fixed random CNN (fastbegan.metrics.RandomFeatures).

    python benchmarks/fidelity_spaces.py     # -> benchmarks/results/fidelity-spaces-<date>.json / .md
"""
from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from studylib import RES, RESULTS, digits_arrays  # noqa: E402


def blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    k = torch.arange(-4, 5).float()
    k = torch.exp(-k ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    w = (k[:, None] * k[None]).expand(3, 1, 9, 9)
    return F.conv2d(F.pad(x, (4, 4, 4, 4), mode="reflect"), w, groups=3)


def degraded_sets(train: torch.Tensor, n: int, one_kind: torch.Tensor) -> dict[str, torch.Tensor]:
    """Real training images (the generator's place) and degraded copies, n each."""
    x = train[:n]
    g = torch.Generator().manual_seed(0)
    return {"real (training images)": x, "blur sigma 1 px": blur(x, 1.0), "blur sigma 2 px": blur(x, 2.0),
            "noise sd 0.2": (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(-1, 1),
            "noise sd 0.5": (x + 0.5 * torch.randn(x.shape, generator=g)).clamp(-1, 1),
            "mean of two real images": (x + train[n:2 * n]) / 2, "shifted 3 px": torch.roll(x, 3, dims=3),
            "few modes (digits: only 3s; faces: 16 faces x 32)": one_kind[:n]}


def spaces(faces: bool) -> dict:
    from fastbegan import metrics as Q
    from fastbegan.metrics.factors import _embed

    def pixels(x):
        x = Q.as_float_images(x)
        return F.adaptive_avg_pool2d(x if faces else x[:, :1], 8).flatten(1)
    out = {"pixels 8x8": pixels, "random-cnn": Q.feature_extractor("random-cnn", RES)}
    if faces:
        est = Q.FactorEstimator.load_or_train(RES)
        out["factor-regressor"] = est.features
        out["factor estimates"] = lambda x: torch.tensor(_embed(est.predict(x)))
    return out


def data(name: str):
    """(held-out reference, training images, one kind repeated) as float NCHW in [-1, 1]."""
    from fastbegan.data import procedural_faces
    from fastbegan.images import to_unit_range
    if name == "digits":
        tr, ho, ytr, _ = digits_arrays(0)
        three = to_unit_range(tr[ytr == 3])
        return to_unit_range(ho), to_unit_range(tr), three[torch.arange(len(ho)) % len(three)]
    tr = to_unit_range(procedural_faces(1024, RES, seed=0)[0])
    fresh = to_unit_range(procedural_faces(512, RES, seed=10_000)[0])
    return fresh, tr, tr[:16].repeat(32, 1, 1, 1)


def main() -> None:
    from fastbegan import metrics as Q
    torch.set_num_threads(1)
    doc = {"created": dt.datetime.now().astimezone().isoformat(timespec="seconds"), "k": 3, "rows": []}
    for name in ("digits", "faces"):
        ref, train, one = data(name)
        n = len(ref)
        for space, feats in spaces(name == "faces").items():
            for what, x in degraded_sets(train, n, one).items():
                f = Q.fidelity(ref, x, feats)
                doc["rows"].append({"data": name, "space": space, "set": what, "n": f["n"],
                                    "precision": f["precision"], "recall": f["recall"]})
    stem = RESULTS / f"fidelity-spaces-{dt.date.today().isoformat()}"
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(doc))
    print(f"wrote {stem}.json / .md")


def markdown(doc: dict) -> str:
    lines = ["# k-NN precision / recall of degraded real images, per feature space", "",
             f"- {doc['created']}; k {doc['k']}; digits: 297 images against the 297 held-out digits (the "
             "quality study's split), faces: 512 against 512 fresh faces; res 32",
             "- cells: precision / recall; a fidelity measure should give real images ~0.9 and the "
             "degraded sets less; few modes should keep precision and lose recall", ""]
    for name in dict.fromkeys(r["data"] for r in doc["rows"]):
        rows = [r for r in doc["rows"] if r["data"] == name]
        sp = list(dict.fromkeys(r["space"] for r in rows))
        lines += [f"## {name}", "", "| set | " + " | ".join(sp) + " |", "|---|" + "---|" * len(sp)]
        for what in dict.fromkeys(r["set"] for r in rows):
            cells = {r["space"]: f"{r['precision']:.2f} / {r['recall']:.2f}" for r in rows if r["set"] == what}
            lines.append(f"| {what} | " + " | ".join(cells[s] for s in sp) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
