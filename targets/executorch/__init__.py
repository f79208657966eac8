"""ExecuTorch targets (android: XNNPACK; qualcomm: QNN)."""

import contextlib
import logging
import warnings


@contextlib.contextmanager
def quiet_toolchain():
    """Silence what ExecuTorch, torchao and torch.export print on every export that says
    nothing about this build (torchao's optional CUDA extensions missing on a CPU machine,
    deprecations inside their own code, dynamo's notes on the cache's in-place updates)."""
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree",
                                               "torch._dynamo", "torch.export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            for message in (r".*isinstance\(treespec, LeafSpec\).*",
                            r"While compiling, we found certain side effects",
                            r"This API is experimental", r".*read_binary is deprecated.*",
                            r".*is an Enum subclass and is now natively supported.*",
                            r"Mutation on a buffer in the model is detected"):
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
