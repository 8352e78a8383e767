"""Training data: image folders and the embedded procedural face data set.

Both end as one ``uint8`` array of shape (N, res, res, 3) (NHWC, RGB) that the trainer
moves to the device once; batches are then drawn on the device (no DataLoader).

Image folders are scanned recursively for jpg/jpeg/png/webp/bmp, center-cropped to a
square, resized (Lanczos) and cached as ``.npy`` keyed by the folder's file list and res.
Unreadable files are skipped and counted; grayscale, palette, RGBA and 16-bit images are
converted to RGB; images smaller than ``res`` are upscaled and counted.

The procedural set ("faces") needs no download: cartoon faces drawn with Pillow with
known factors of variation (skin hue, face size, pose x/y, tilt, smile, eye size,
background hue), deterministic per seed and any resolution. The factors are returned
too, so sample quality can be measured without a pretrained network.
"""
from __future__ import annotations

import colorsys
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
FACTORS = ("skin_hue", "size", "pose_x", "pose_y", "tilt", "smile", "eye_size", "bg_hue")


class DataError(ValueError):
    """Bad training data, with a message that says what to do."""


@dataclass
class DataReport:
    """What loading a folder found (printed by ``fastbegan prepare`` / ``train``)."""
    source: str
    found: int = 0
    loaded: int = 0
    unreadable: list[str] = field(default_factory=list)
    upscaled: int = 0
    converted: int = 0
    cache: str | None = None
    from_cache: bool = False

    def summary(self) -> str:
        s = f"{self.loaded} images from {self.source}"
        if self.from_cache:
            s += f" (cache {self.cache})"
        extra = []
        if self.unreadable:
            extra.append(f"{len(self.unreadable)} unreadable skipped")
        if self.converted:
            extra.append(f"{self.converted} converted to RGB")
        if self.upscaled:
            extra.append(f"{self.upscaled} smaller than res, upscaled")
        return s + (f" [{', '.join(extra)}]" if extra else "")


# --------------------------------------------------------------------------- folders

def list_images(folder: str | os.PathLike) -> list[Path]:
    root = Path(folder).expanduser()
    if not root.exists():
        raise DataError(f"data folder {str(root)!r} does not exist: pass --data with a folder "
                        "of images, or leave --data out to use the embedded procedural data set")
    if not root.is_dir():
        raise DataError(f"--data {str(root)!r} is not a folder (nor a .npy cache from `fastbegan prepare`)")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise DataError(f"data folder {str(root)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}), "
                        "searched recursively")
    return files


def load_image(path: Path, res: int, report: DataReport | None = None) -> np.ndarray:
    """One image -> (res, res, 3) uint8: RGB, center square crop, Lanczos resize."""
    with Image.open(path) as im:
        im.load()
        if im.mode != "RGB":
            if report is not None:
                report.converted += 1
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)
                scale = 65535.0 if arr.max() > 255 else 255.0
                im = Image.fromarray((arr / scale * 255).clip(0, 255).astype(np.uint8), "L")
            if im.mode in ("RGBA", "LA", "P", "PA"):
                rgba = im.convert("RGBA")
                bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, rgba)
            im = im.convert("RGB")
        w, h = im.size
        side = min(w, h)
        if side < res and report is not None:
            report.upscaled += 1
        left, top = (w - side) // 2, (h - side) // 2
        im = im.crop((left, top, left + side, top + side)).resize((res, res), Image.LANCZOS)
        return np.asarray(im, dtype=np.uint8)


def _folder_key(files: list[Path], res: int) -> str:
    h = hashlib.sha1(str(res).encode())
    for p in files:
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def default_cache_dir() -> Path:
    return Path(os.environ.get("FASTBEGAN_CACHE", Path.home() / ".cache" / "fastbegan"))


def read_json_table(path: Path) -> dict:
    """A JSON object kept in the cache (compile records, dropped kernel paths); {} when the
    file is missing, unreadable or not an object."""
    try:
        table = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return table if isinstance(table, dict) else {}


def write_json_atomic(path: Path, table: dict) -> bool:
    """Write ``table`` as JSON through a temporary file and a rename (never a half file);
    False if the cache cannot be written (the record is lost, nothing else)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
        os.replace(tmp, path)
        return True
    except OSError:
        return False


def save_array_atomic(path: Path, arr: np.ndarray) -> None:
    """np.save to a temporary file in the same folder, then rename: never a half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.save(f, arr)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_cache(cache: Path, report: DataReport) -> np.ndarray | None:
    """The cached array, or None (no cache, or a damaged one: deleted and rebuilt, not trusted)."""
    report.cache = str(cache)
    if not cache.exists():
        return None
    try:
        arr = np.load(cache)
    except (OSError, ValueError):
        cache.unlink(missing_ok=True)
        return None
    report.loaded, report.from_cache = len(arr), True
    return arr


def load_folder(folder: str | os.PathLike, res: int, cache_dir: str | os.PathLike | None = None,
                progress: bool = False) -> tuple[np.ndarray, DataReport]:
    """Folder of images -> ((N, res, res, 3) uint8, report). Cached as .npy in cache_dir."""
    files = list_images(folder)
    report = DataReport(source=str(folder), found=len(files))
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache = cache_dir / f"{Path(folder).expanduser().resolve().name}-{res}-{_folder_key(files, res)}.npy"
    arr = _read_cache(cache, report)
    if arr is not None:
        return arr, report
    out = np.empty((len(files), res, res, 3), np.uint8)
    it = files
    if progress:
        from tqdm import tqdm
        it = tqdm(files, desc="preparing images", unit="img")
    n = 0
    for p in it:
        try:
            out[n] = load_image(p, res, report)
            n += 1
        except Exception:  # PIL raises many types for broken files: skip and count
            report.unreadable.append(str(p))
    if n == 0:
        raise DataError(f"none of the {len(files)} image files in {str(folder)!r} could be read "
                        "(all corrupt or unsupported)")
    arr = out[:n]
    report.loaded = n
    try:
        save_array_atomic(cache, arr)
    except OSError:
        report.cache = None  # read-only cache dir: train anyway, just without a cache
    return arr, report


def load_npy(path: str | os.PathLike, res: int) -> np.ndarray:
    arr = np.load(path)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise DataError(f"{path}: expected a (N, H, W, 3) uint8 array from `fastbegan prepare`")
    if arr.shape[1:3] != (res, res):
        raise DataError(f"{path} holds {arr.shape[1]}x{arr.shape[2]} images but --res is {res}: "
                        f"run `fastbegan prepare` again with --res {res}")
    return arr


# --------------------------------------------------------------------------- procedural faces

def _rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return int(r * 255), int(g * 255), int(b * 255)


def sample_factors(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The known factors of n faces, each uniform on [0, 1] (deterministic per seed)."""
    rng = np.random.default_rng(seed)
    u = rng.random((n, len(FACTORS)))
    return {name: u[:, i] for i, name in enumerate(FACTORS)}


def draw_face(f: dict[str, float], res: int) -> np.ndarray:
    """Render one face with factors ``f`` (each in [0, 1]) at res x res -> uint8 (res, res, 3)."""
    s = 4 * res  # draw large, downsample: anti-aliasing for free
    im = Image.new("RGB", (s, s), _rgb(f["bg_hue"], 0.35, 0.85))
    d = ImageDraw.Draw(im)
    cx = s * (0.5 + 0.16 * (f["pose_x"] - 0.5))
    cy = s * (0.52 + 0.12 * (f["pose_y"] - 0.5))
    r = s * (0.26 + 0.14 * f["size"])
    skin = _rgb(0.02 + 0.10 * f["skin_hue"], 0.30 + 0.35 * f["skin_hue"], 0.95 - 0.45 * f["skin_hue"])
    # hair behind the head, the head, then the features (all relative to the head)
    d.ellipse([cx - 1.08 * r, cy - 1.28 * r, cx + 1.08 * r, cy + 0.55 * r], fill=_rgb(0.08, 0.6, 0.25))
    d.ellipse([cx - 0.85 * r, cy - 1.05 * r, cx + 0.85 * r, cy + 1.05 * r], fill=skin)
    ex, ey = 0.36 * r, 0.22 * r
    er = r * (0.09 + 0.09 * f["eye_size"])
    tilt = (f["tilt"] - 0.5) * 0.5  # eyes move up/down in opposite directions: head roll
    for side in (-1, 1):
        x, y = cx + side * ex, cy - ey + side * tilt * ex
        d.ellipse([x - 1.5 * er, y - er, x + 1.5 * er, y + er], fill=(250, 250, 250))
        d.ellipse([x - 0.6 * er, y - 0.6 * er, x + 0.6 * er, y + 0.6 * er], fill=(40, 30, 30))
    d.polygon([(cx, cy - 0.05 * r), (cx - 0.1 * r, cy + 0.25 * r), (cx + 0.1 * r, cy + 0.25 * r)],
              fill=_rgb(0.03, 0.5, 0.6))
    mw, my = 0.35 * r, cy + 0.55 * r
    bend = (f["smile"] - 0.4) * 0.5 * r  # > 0 smiles, < 0 frowns
    box = [cx - mw, my - abs(bend) - 0.02 * r, cx + mw, my + abs(bend) + 0.02 * r]
    d.arc(box, 0 if bend >= 0 else 180, 180 if bend >= 0 else 360, fill=(150, 30, 40),
          width=max(2, int(0.06 * r)))
    return np.asarray(im.resize((res, res), Image.LANCZOS), dtype=np.uint8)


def procedural_faces(n: int, res: int, seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The embedded data set: ((n, res, res, 3) uint8, factors dict of (n,) arrays)."""
    factors = sample_factors(n, seed)
    out = np.empty((n, res, res, 3), np.uint8)
    for i in range(n):
        out[i] = draw_face({k: float(v[i]) for k, v in factors.items()}, res)
    return out, factors


def load_procedural(res: int, n: int = 4096, seed: int = 0,
                    cache_dir: str | os.PathLike | None = None) -> tuple[np.ndarray, DataReport]:
    """The procedural faces, cached like a folder (drawing 4096 faces takes a few seconds)."""
    report = DataReport(source=f"embedded procedural faces (n={n}, seed={seed})", found=n)
    cache = Path(cache_dir or default_cache_dir()) / f"procedural-faces-v1-{res}-{n}-{seed}.npy"
    arr = _read_cache(cache, report)
    if arr is not None:
        return arr, report
    arr, _ = procedural_faces(n, res, seed)
    report.loaded = n
    try:
        save_array_atomic(cache, arr)
    except OSError:
        report.cache = None
    return arr, report


def load_dataset(data: str | None, res: int, *, cache_dir=None, n_procedural: int = 4096,
                 seed: int = 0, progress: bool = False) -> tuple[np.ndarray, DataReport]:
    """``--data`` resolution: None -> procedural faces; a .npy -> prepared cache; else a folder."""
    if data is None:
        return load_procedural(res, n_procedural, seed, cache_dir)
    if str(data).endswith(".npy") and Path(data).is_file():
        arr = load_npy(data, res)
        return arr, DataReport(source=str(data), found=len(arr), loaded=len(arr), from_cache=True,
                               cache=str(data))
    return load_folder(data, res, cache_dir, progress=progress)
