"""diffusers integration (processors, apply/remove). Needs ``pip install "visattn[diffusers]"``."""

try:
    import diffusers  # noqa: F401
except ImportError as e:  # a clear message naming the extra, raised on use of visattn.pipelines
    raise ImportError(
        'visattn.pipelines needs diffusers: pip install "visattn[diffusers]"'
    ) from e
