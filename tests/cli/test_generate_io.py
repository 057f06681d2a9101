"""``visattn generate`` output writing: GIF through Pillow, the MP4 choice of ``--format auto`` and its
visible fallback (``visattn/cli/_generate_io.py``)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageSequence

from visattn.cli import _generate_io
from visattn.cli._generate_io import save_output

# five distinct two-colour frames: exact in a GIF palette, so frames read back bit for bit
_COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]


def _video(frames=5, h=24, w=40) -> np.ndarray:
    """``[F, H, W, 3]`` in [0, 1]: frame ``i`` is a checkerboard of colour ``i`` and black."""
    yy, xx = np.mgrid[:h, :w]
    board = ((yy // 4 + xx // 4) % 2).astype(np.float32)[..., None]
    return np.stack([board * np.array(_COLOURS[i], np.float32) / 255 for i in range(frames)])


def _no_mp4(monkeypatch, reason="no MP4 writer in this test"):
    monkeypatch.setattr(_generate_io, "mp4_unavailable_reason", lambda: reason)


def test_gif_frames_and_size_read_back(tmp_path):
    arr = _video()
    files, note = save_output(arr, tmp_path, "m_seed0", video=True, fmt="gif")
    assert files == ["m_seed0.gif"] and note is None
    with Image.open(tmp_path / "m_seed0.gif") as im:
        assert im.format == "GIF" and im.n_frames == 5 and im.size == (40, 24)  # PIL size is (W, H)
        assert im.info.get("loop") == 0
        frames = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)]
    expected = (arr * 255).round().astype(np.uint8)
    for i, f in enumerate(frames):
        np.testing.assert_array_equal(f, expected[i], err_msg=f"frame {i}")


def test_auto_without_mp4_writer_writes_gif_and_says_why(tmp_path, monkeypatch):
    _no_mp4(monkeypatch)
    files, note = save_output(_video(), tmp_path, "v", video=True, fmt="auto")
    assert files == ["v.gif"] and (tmp_path / "v.gif").is_file()
    assert note == "wrote a GIF instead of MP4: no MP4 writer in this test"
    with pytest.raises(ImportError, match="--format mp4 cannot write the video: no MP4 writer in this test"):
        save_output(_video(), tmp_path, "v", video=True, fmt="mp4")


def test_auto_with_mp4_writer_uses_export_to_video(tmp_path, monkeypatch):
    diffusers_utils = pytest.importorskip("diffusers.utils")
    calls = []

    def fake_export(frames, path, fps):
        calls.append((len(frames), frames[0].size, fps))
        open(path, "wb").close()
        return path

    monkeypatch.setattr(_generate_io, "mp4_unavailable_reason", lambda: None)
    monkeypatch.setattr(diffusers_utils, "export_to_video", fake_export)
    files, note = save_output(_video(), tmp_path, "v", video=True, fmt="auto")
    assert files == ["v.mp4"] and note is None and calls == [(5, (40, 24), _generate_io.VIDEO_FPS)]

    def failing_export(frames, path, fps):
        raise RuntimeError("codec missing")

    monkeypatch.setattr(diffusers_utils, "export_to_video", failing_export)
    files, note = save_output(_video(), tmp_path, "w", video=True, fmt="auto")
    assert files == ["w.gif"] and "MP4 writer failed (RuntimeError: codec missing)" in note
    with pytest.raises(RuntimeError, match="codec missing"):
        save_output(_video(), tmp_path, "w", video=True, fmt="mp4")


def test_png_frames_npy_and_images(tmp_path):
    arr = _video(frames=3)
    files, note = save_output(arr, tmp_path, "v", video=True, fmt="png")
    assert files == [f"v_frame{i:03d}.png" for i in range(3)] and note is None
    files, note = save_output(arr, tmp_path, "v", video=True, fmt="npy")
    assert files == ["v.npy"] and note is None
    np.testing.assert_array_equal(np.load(tmp_path / "v.npy"), arr)
    img = arr[:1]
    assert save_output(img, tmp_path, "i", video=False, fmt="auto") == (["i.png"], None)
    files, note = save_output(img, tmp_path, "j", video=False, fmt="gif")
    assert files == ["j.png"] and note == "the pipeline made images, not a video: wrote PNG instead of GIF"
    with Image.open(tmp_path / "j.png") as im:
        assert im.size == (40, 24)


def test_mp4_unavailable_reason_matches_the_installed_writers():
    from importlib.util import find_spec

    reason = _generate_io.mp4_unavailable_reason()
    if find_spec("imageio") is None and find_spec("cv2") is None:
        assert "pip install imageio-ffmpeg" in reason
    elif find_spec("imageio") is not None and find_spec("imageio_ffmpeg") is None:
        assert reason is not None and "imageio has no ffmpeg" in reason
    else:
        assert reason is None or "ffmpeg" in reason
