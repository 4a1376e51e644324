"""The distillation loss of the 1st place (step 5), and its CE-only special case.

    loss = (1 - alpha) * CE_ls(student, labels)
         + mean over teacher families f of [ alpha * T^2 * KL(p_f,T || p_s,T)
                                            + mse_weight * MSE(p_f,T, p_s,T)
                                            + cos_weight * (1 - cos(p_f,T, p_s,T)) ]

``T`` is the KD temperature (not the calibration one). ``T^2`` keeps the soft-target gradients on
the scale of the hard-target ones (Hinton et al.). Teachers arrive as OOF probabilities; their
logits are ``log p`` (softmax(log p / T) is the tempered teacher distribution). With alpha=0 and
no mse/cos weight the loss is exactly the label-smoothed cross-entropy: the CE-only baseline.
Labels may be soft (rows of probabilities); label smoothing mixes them with the uniform.
"""

from __future__ import annotations

from typing import Any

EPS = 1e-7


def soft_cross_entropy(logits: Any, targets: Any, label_smoothing: float = 0.0) -> Any:
    """Mean CE of ``logits`` (n, C) against probability ``targets`` (n, C), label-smoothed."""
    import torch

    c = logits.shape[-1]
    t = targets.to(logits.dtype)
    if label_smoothing:
        t = (1.0 - label_smoothing) * t + label_smoothing / c
    return -(t * torch.log_softmax(logits, dim=-1)).sum(-1).mean()


def teacher_logits_from_probs(probs: Any) -> Any:
    """Teacher probabilities -> logits (log p, clamped): softmax(log p) == p."""
    import torch

    return torch.log(probs.clamp_min(EPS))


def kd_loss(
    student_logits: Any,
    labels: Any,
    teacher_logits: Any | None,
    alpha: float,
    temperature: float,
    label_smoothing: float = 0.0,
    mse_weight: float = 0.0,
    cos_weight: float = 0.0,
) -> tuple[Any, dict[str, float]]:
    """The loss above. ``teacher_logits``: (n, F, C) for F families, or None (CE only).

    Returns the scalar loss and its parts (floats, for logging).
    """
    import torch
    import torch.nn.functional as F

    logits = student_logits.float()
    ce = soft_cross_entropy(logits, labels, label_smoothing)
    parts = {"ce": float(ce.detach())}
    use_teacher = teacher_logits is not None and (alpha > 0 or mse_weight > 0 or cos_weight > 0)
    if not use_teacher:
        return ce if alpha == 0 else (1.0 - alpha) * ce, parts
    t = float(temperature)
    tl = teacher_logits.float()
    if tl.dim() == 2:
        tl = tl.unsqueeze(1)
    log_ps = torch.log_softmax(logits / t, dim=-1)  # (n, C)
    ps = log_ps.exp()
    kd_total = logits.new_zeros(())
    kl_sum = 0.0
    nf = tl.shape[1]
    for f in range(nf):
        log_pt = torch.log_softmax(tl[:, f] / t, dim=-1)
        pt = log_pt.exp()
        # KL(p_t || p_s) per row, batch mean; kl_div(input=log q, target=log p, log_target) = sum p (log p - log q)
        kl = F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True)
        term = alpha * t * t * kl
        if mse_weight:
            term = term + mse_weight * ((ps - pt) ** 2).sum(-1).mean()
        if cos_weight:
            term = term + cos_weight * (1.0 - F.cosine_similarity(ps, pt, dim=-1)).mean()
        kd_total = kd_total + term
        kl_sum += float(kl.detach())
    loss = (1.0 - alpha) * ce + kd_total / nf
    parts["kl"] = kl_sum / nf
    return loss, parts
