"""Evaluation: perplexity, KL divergence and top-1 agreement against a reference model.

Text is cut into non-overlapping windows (default 512 tokens, no special tokens), each scored
independently; the first token of a window is context only. KL is KL(reference || candidate) of the
next-token distributions, averaged over predicted tokens, in nats.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch.nn import functional as F

from .progress import progress_bar


@dataclass
class EvalResult:
    perplexity: float
    tokens: int
    windows: int
    kl_divergence: float | None = None
    top1_agreement: float | None = None
    reference_perplexity: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, use_cache=False)
    return (out.logits if hasattr(out, "logits") else out).float()


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, reference=None, device: str = "cpu",
             batch_size: int = 1, description: str = "evaluating") -> EvalResult:
    """Perplexity of `model`; with `reference`, also KL and top-1 agreement against it."""
    nll_sum, ref_nll_sum, kl_sum, agree, count = 0.0, 0.0, 0.0, 0, 0
    with progress_bar() as bar:
        task = bar.add_task(description, total=windows.shape[0])
        for start in range(0, windows.shape[0], batch_size):
            ids = windows[start:start + batch_size].to(device)
            targets = ids[:, 1:].reshape(-1)
            logits = _logits(model, ids)[:, :-1]
            logp = F.log_softmax(logits, -1).reshape(-1, logits.shape[-1])
            nll_sum += float(F.nll_loss(logp, targets, reduction="sum"))
            if reference is not None:
                ref_logp = F.log_softmax(_logits(reference, ids)[:, :-1], -1).reshape(logp.shape)
                ref_nll_sum += float(F.nll_loss(ref_logp, targets, reduction="sum"))
                kl_sum += float((ref_logp.exp() * (ref_logp - logp)).sum())
                agree += int((ref_logp.argmax(-1) == logp.argmax(-1)).sum())
            count += targets.numel()
            bar.advance(task, ids.shape[0])
    result = EvalResult(perplexity=math.exp(nll_sum / count), tokens=count, windows=windows.shape[0])
    if reference is not None:
        result.kl_divergence = kl_sum / count
        result.top1_agreement = agree / count
        result.reference_perplexity = math.exp(ref_nll_sum / count)
    return result


@torch.no_grad()
def reference_log_probs(model, windows: torch.Tensor, device: str = "cpu",
                        dtype: torch.dtype = torch.float16) -> list[torch.Tensor]:
    """Log-probabilities of `model` per window, kept (in `dtype`) for repeated comparisons."""
    return [F.log_softmax(_logits(model, windows[i:i + 1].to(device))[0, :-1], -1).to(dtype)
            for i in range(windows.shape[0])]


@torch.no_grad()
def compare_to_cached(model, windows: torch.Tensor, cached: list[torch.Tensor],
                      device: str = "cpu") -> tuple[float, float]:
    """(mean KL vs the cached reference, mean cross-entropy increase), in nats per token."""
    kl_sum, dce_sum, count = 0.0, 0.0, 0
    for i in range(windows.shape[0]):
        ids = windows[i:i + 1].to(device)
        logp = F.log_softmax(_logits(model, ids)[0, :-1], -1)
        ref = cached[i].float()
        targets = ids[0, 1:]
        kl_sum += float((ref.exp() * (ref - logp)).sum())
        dce_sum += float(F.nll_loss(logp, targets, reduction="sum")
                         - F.nll_loss(ref, targets, reduction="sum"))
        count += targets.numel()
    return kl_sum / count, dce_sum / count
