"""Frames sampled evenly from an animated image, as multi-frame input."""

from __future__ import annotations

import pytest
from PIL import Image

from palikit.video import read_frames


def test_gif_frames_are_sampled_evenly(tmp_path):
    frames = [Image.new("RGB", (20, 10), (i * 25, 0, 0)) for i in range(10)]
    frames[0].save(tmp_path / "clip.gif", save_all=True, append_images=frames[1:], duration=40)
    got = read_frames(tmp_path / "clip.gif", 4)
    assert [f.getpixel((0, 0))[0] for f in got] == [0, 50, 125, 175]
    assert all(f.mode == "RGB" and f.size == (20, 10) for f in got)
    assert len(read_frames(tmp_path / "clip.gif", 50)) == 10


def test_bad_video_arguments(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_frames(tmp_path / "missing.mp4")
    (tmp_path / "x.gif").write_bytes(b"GIF89a")
    with pytest.raises(ValueError, match="num_frames"):
        read_frames(tmp_path / "x.gif", 0)
