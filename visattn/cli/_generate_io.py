"""I/O of ``visattn generate``: loading pipelines, calling them uniformly, saving outputs, metrics."""

from __future__ import annotations

import importlib.metadata
import inspect
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def versions() -> dict[str, Any]:
    import visattn

    out: dict[str, Any] = {"visattn": visattn.__version__, "python": platform.python_version()}
    for dist in ("torch", "triton", "diffusers", "transformers"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    out["cuda"] = torch.version.cuda
    out["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return out


def load_pipeline(args, dtype: torch.dtype, device: torch.device):
    """The tiny offline pipeline (``--tiny``) or ``DiffusionPipeline.from_pretrained(--model)``."""
    if args.tiny:
        from visattn.pipelines._tiny_pipes import tiny_pipeline

        return tiny_pipeline(args.tiny, dtype=dtype, device=device)
    from diffusers import DiffusionPipeline
    from diffusers.utils import DummyObject

    local = Path(args.model).is_dir()
    from diffusers.utils import deprecation_utils

    # diffusers 0.42 renamed torch_dtype to dtype (the old name warns); earlier releases know only torch_dtype
    dtype_key = "dtype" if hasattr(deprecation_utils, "_TORCH_DTYPE_DEPRECATION_MESSAGE") else "torch_dtype"
    kw = {dtype_key: dtype, "revision": args.revision}
    if args.offline or local:
        kw["local_files_only"] = True
    try:
        pipe = DiffusionPipeline.from_pretrained(args.model, **kw)
    except (ImportError, AttributeError) as e:
        if "transformers" in str(e).lower():
            raise ImportError(
                f"loading {args.model!r} needs the text encoders: pip install transformers"
            ) from e
        raise
    if isinstance(type(pipe), DummyObject) or isinstance(pipe, DummyObject):
        raise ImportError(f"{type(pipe).__name__} needs missing packages (pip install transformers)")
    return pipe.to(device)


class StepClock:
    """``callback_on_step_end`` that stamps the end of each step and forwards to the handle's callback."""

    def __init__(self, handle) -> None:
        self.handle = handle
        self.last: float | None = None

    def __call__(self, pipe, i, t, kwargs):
        self.last = time.perf_counter()
        if self.handle is not None:
            return self.handle.callback(pipe, i, t, kwargs)
        return kwargs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_pipeline(
    pipe, args, steps: int, device: torch.device, clock: StepClock | None, progress: bool
) -> tuple[np.ndarray, dict[str, float | None], bool]:
    """One generation: ``(array, times, is_video)``; the array is ``[N, H, W, 3]`` (images) or
    ``[F, H, W, 3]`` (video frames) in [0, 1]."""
    _sync(device)
    t0 = time.perf_counter()
    if clock is not None:
        clock.last = None
    if hasattr(pipe, "generate"):  # tiny pipelines
        arr = pipe.generate(
            steps=steps,
            guidance=args.guidance if args.guidance is not None else 4.0,
            seed=args.seed,
            height=args.height,
            width=args.width,
            frames=args.frames,
            progress=progress,
            class_label=args.class_label,
            callback=clock,
        )
        video = getattr(pipe, "kind", "image") == "video"
    else:
        params = inspect.signature(pipe.__call__).parameters
        kw: dict[str, Any] = dict(num_inference_steps=steps, output_type="np")
        opt = dict(
            prompt=args.prompt,
            negative_prompt=args.negative_prompt,
            guidance_scale=args.guidance,
            height=args.height,
            width=args.width,
            num_frames=args.frames,
        )
        kw.update({k: v for k, v in opt.items() if v is not None and k in params})
        if "class_labels" in params:
            kw["class_labels"] = [args.class_label]
        if "generator" in params:
            kw["generator"] = torch.Generator(device="cpu").manual_seed(args.seed)
        if "callback_on_step_end" in params and clock is not None:
            kw["callback_on_step_end"] = clock
        pipe.set_progress_bar_config(desc=args.method, disable=not progress)
        out = pipe(**kw)
        arr = getattr(out, "frames", None)
        video = arr is not None
        arr = getattr(out, "images", None) if arr is None else arr[0]
        arr = np.asarray(arr, dtype=np.float32)
    _sync(device)
    t1 = time.perf_counter()
    denoise = None if clock is None or clock.last is None else clock.last - t0
    times = {
        "generate_s": t1 - t0,
        "denoise_s": denoise,
        "decode_s": None if denoise is None else t1 - clock.last,
    }
    return np.asarray(arr, dtype=np.float32), times, video


VIDEO_FPS = 16


def mp4_unavailable_reason() -> str | None:
    """Why ``diffusers.utils.export_to_video`` cannot write MP4 here, or ``None`` when it can.

    diffusers writes through imageio when imageio is installed (which then needs its ffmpeg plugin,
    ``imageio-ffmpeg``) and only otherwise through OpenCV, so imageio without ffmpeg cannot write MP4
    even when OpenCV is present.
    """
    from importlib.util import find_spec

    if find_spec("imageio") is not None:
        try:
            import imageio.plugins.ffmpeg as ffmpeg_plugin

            ffmpeg_plugin.get_exe()
        except Exception as e:  # ImportError without imageio-ffmpeg; RuntimeError without a binary
            return f"imageio has no ffmpeg ({type(e).__name__}: {e}); pip install imageio-ffmpeg"
        return None
    if find_spec("cv2") is not None:
        return None
    return "neither imageio with imageio-ffmpeg nor opencv-python is installed; pip install imageio-ffmpeg"


def _save_gif(frames: np.ndarray, path: Path, fps: int) -> None:
    """An endlessly looping GIF of ``[F, H, W, 3]`` uint8 frames, written with Pillow.

    GIF stores delays in 1/100 s, so the frame time is rounded to 10 ms. Pillow merges consecutive
    identical frames into one longer frame: the playback time is kept, the frame count can drop.
    """
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    frame_ms = 10 * max(1, round(100 / fps))
    images[0].save(path, save_all=True, append_images=images[1:], duration=frame_ms, loop=0)


def save_output(
    arr: np.ndarray, out: Path, stem: str, video: bool, fmt: str
) -> tuple[list[str], str | None]:
    """Save a generation; returns ``(file names, note)``.

    Images are PNG. A video is MP4 (through ``diffusers.utils.export_to_video``), a GIF (Pillow) or PNG
    frames; ``auto`` writes MP4 when a writer is installed (:func:`mp4_unavailable_reason`), else a GIF.
    ``npy`` saves the float array. ``note`` is ``None`` when the output is in the asked format and
    otherwise says what was written instead and why (callers print it; nothing falls back silently).

    Raises:
        ImportError: ``fmt="mp4"`` for a video and no MP4 writer is installed.
    """
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    if fmt == "npy":
        np.save(out / f"{stem}.npy", arr)
        return [f"{stem}.npy"], None
    u8 = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
    note = None
    if video and fmt in ("auto", "mp4"):
        reason = mp4_unavailable_reason()
        if reason is None:
            from diffusers.utils import export_to_video

            path = out / f"{stem}.mp4"
            try:
                export_to_video([Image.fromarray(f) for f in u8], str(path), fps=VIDEO_FPS)
                return [path.name], None
            except Exception as e:  # a writer that is installed but fails (codec, permissions)
                if fmt == "mp4":
                    raise
                reason = f"the MP4 writer failed ({type(e).__name__}: {e})"
        elif fmt == "mp4":
            raise ImportError(f"--format mp4 cannot write the video: {reason}")
        note = f"wrote a GIF instead of MP4: {reason}"
        fmt = "gif"
    if video and fmt == "gif":
        _save_gif(u8, out / f"{stem}.gif", VIDEO_FPS)
        return [f"{stem}.gif"], note
    if not video and fmt in ("mp4", "gif"):
        note = f"the pipeline made images, not a video: wrote PNG instead of {fmt.upper()}"
    files: list[str] = []
    for i, img in enumerate(u8):
        name = f"{stem}_frame{i:03d}.png" if video else (f"{stem}.png" if len(u8) == 1 else f"{stem}_{i}.png")
        Image.fromarray(img).save(out / name)
        files.append(name)
    return files, note


def compare(a: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """PSNR (data range 1), relative L2 and cosine of ``a`` against ``ref``."""
    a64, r64 = a.astype(np.float64).ravel(), ref.astype(np.float64).ravel()
    mse = float(np.mean((a64 - r64) ** 2))
    psnr = math.inf if mse == 0 else 10 * math.log10(1.0 / mse)
    rel = float(np.linalg.norm(a64 - r64) / max(np.linalg.norm(r64), 1e-12))
    cos = float(a64 @ r64 / max(np.linalg.norm(a64) * np.linalg.norm(r64), 1e-12))
    return {"psnr_db": psnr, "rel_l2": rel, "cosine": cos}


def write_report(out: Path, report: dict) -> Path:
    path = out / "report.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path
