"""The KD loss against a hand computation; alpha=0 is CE; KD pulls a student to its teacher."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from arena_assets.gpu.losses import kd_loss, soft_cross_entropy, teacher_logits_from_probs


def _np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_kd_term_equals_hand_computation() -> None:
    s = torch.tensor([[1.0, -0.5, 0.2], [0.3, 0.9, -1.2]])
    tp = torch.tensor([[0.7, 0.2, 0.1], [0.25, 0.5, 0.25]])
    y = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    T = 2.0
    loss, parts = kd_loss(s, y, teacher_logits_from_probs(tp).unsqueeze(1), alpha=1.0, temperature=T)
    # by hand: p_t,T = softmax(log p_t / T), p_s,T = softmax(s / T); KL(p_t || p_s) * T^2, row mean
    pt = _np_softmax(np.log(tp.numpy()) / T)
    ps = _np_softmax(s.numpy() / T)
    kl = float(np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), axis=1)))
    assert loss.item() == pytest.approx(kl * T * T, rel=1e-5)
    assert parts["kl"] == pytest.approx(kl, rel=1e-5)


def test_mixture_and_families_average() -> None:
    s = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    y = torch.eye(3)[[0, 1, 2, 0]]
    t1, t2 = torch.randn(4, 3), torch.randn(4, 3)
    a, T = 0.3, 1.5
    both, _ = kd_loss(s, y, torch.stack([t1, t2], 1), alpha=a, temperature=T)
    l1, _ = kd_loss(s, y, t1.unsqueeze(1), alpha=a, temperature=T)
    l2, _ = kd_loss(s, y, t2.unsqueeze(1), alpha=a, temperature=T)
    assert both.item() == pytest.approx((l1.item() + l2.item()) / 2, rel=1e-5)  # CE part shared


def test_alpha_zero_is_label_smoothed_ce() -> None:
    s = torch.tensor([[2.0, 0.0, -1.0]])
    y = torch.tensor([[0.0, 1.0, 0.0]])
    t = torch.randn(1, 2, 3)
    loss, _ = kd_loss(s, y, t, alpha=0.0, temperature=3.0, label_smoothing=0.1)
    target = 0.9 * y + 0.1 / 3
    hand = -(target * torch.log_softmax(s, -1)).sum().item()
    assert loss.item() == pytest.approx(hand, rel=1e-6)
    assert soft_cross_entropy(s, y).item() == pytest.approx(-math.log(torch.softmax(s, -1)[0, 1].item()), rel=1e-6)


def test_kd_moves_student_toward_teacher() -> None:
    """A linear student trained with alpha=1 on a teacher that disagrees with the labels ends up
    closer (KL) to the teacher than a CE-only student from the same init does."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = torch.eye(3)[torch.randint(0, 3, (256,), generator=g)]
    teacher_p = torch.softmax(x @ torch.randn(8, 3, generator=g), -1)
    tl = teacher_logits_from_probs(teacher_p).unsqueeze(1)

    def train(alpha: float) -> torch.Tensor:
        torch.manual_seed(1)
        lin = torch.nn.Linear(8, 3)
        opt = torch.optim.Adam(lin.parameters(), lr=0.05)
        for _ in range(200):
            loss, _ = kd_loss(lin(x), y, tl, alpha=alpha, temperature=2.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return torch.softmax(lin(x), -1).detach()

    def kl_to_teacher(p: torch.Tensor) -> float:
        return float((teacher_p * (teacher_p.log() - p.log())).sum(-1).mean())

    torch.manual_seed(1)
    init = torch.softmax(torch.nn.Linear(8, 3)(x), -1).detach()
    kd, ce = train(1.0), train(0.0)
    assert kl_to_teacher(kd) < 0.5 * kl_to_teacher(init)
    assert kl_to_teacher(kd) < 0.5 * kl_to_teacher(ce)
