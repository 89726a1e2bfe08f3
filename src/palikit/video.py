"""Frames from a video or animated image, evenly sampled (PaliGemma encodes each frame separately
and concatenates their tokens). GIF / animated WebP / TIFF through Pillow; other containers
through PyAV (`pip install av`)."""

from __future__ import annotations

from pathlib import Path

VIDEO_SUFFIXES = {".mp4", ".mov", ".avi", ".mkv", ".webm", ".gif"}


def _even(n_total: int, n: int) -> list[int]:
    if n_total <= 0:
        return []
    n = min(n, n_total)
    return [int(i * n_total / n) for i in range(n)]


def read_frames(path: str | Path, num_frames: int = 8) -> list:
    """`num_frames` RGB PIL images sampled evenly over the clip."""
    from PIL import Image, ImageSequence

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No such video: {path}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if path.suffix.lower() in {".gif", ".webp", ".tif", ".tiff"}:
        with Image.open(path) as im:
            frames = [f.convert("RGB") for f in ImageSequence.Iterator(im)]
        return [frames[i] for i in _even(len(frames), num_frames)]
    try:
        import av
    except ImportError:
        raise ImportError(f"Reading {path.suffix} video needs PyAV: pip install av") from None
    try:
        with av.open(str(path)) as container:
            frames = [f.to_image() for f in container.decode(video=0)]
    except av.AVError as e:  # type: ignore[attr-defined]
        raise ValueError(f"{path} could not be decoded as video ({e}).") from None
    if not frames:
        raise ValueError(f"{path} has no video frames.")
    return [frames[i] for i in _even(len(frames), num_frames)]
