"""C runtime kernels of apq-sdk (``apq_kernels.c``/``.h``), shipped as package data.

Build and load them with :mod:`apq_sdk.runtime_kernels_build`; the layout and arithmetic they
implement are specified in ``docs/formats.md``.
"""
