"""The ``visattn`` command line (``visattn`` console script and ``python -m visattn``)."""
