"""Baseline: the training-step structure of the popular PyTorch BEGAN port, written fresh.

What most people run when they train BEGAN in PyTorch: per step, ``fake = G(z)``; D is
applied three times, to the real batch, to ``fake.detach()`` (for L_D) and to ``fake``
(for L_G); one backward of ``L_D + L_G``; both Adam optimisers step; k_t is a Python
float updated with ``.item()`` (a host synchronisation). fp32, eager, PyTorch defaults
(NCHW). Because the one backward runs through ``D(fake)``, D also receives L_G's
gradient: that port's known bug, kept so that the baseline is the code users run
(fastbegan trains D on L_D only; tests/test_train.py catches the bug in fastbegan).

Same model, data, optimisers and losses as fastbegan (the ``Trainer`` it is given).
"""
from __future__ import annotations

import torch

from fastbegan import ops
from fastbegan.step import ReferenceStep


class PortStep:
    """``PortStep(trainer)()``: one step of the port's structure on ``trainer``'s model,
    data and optimisers (no fused Adam, no autocast). Returns the losses and k_t as floats."""

    def __init__(self, trainer):
        self.tr = trainer
        self.draws = ReferenceStep(trainer)  # the same batches and z as the reference step
        self.k = float(trainer.k)

    def losses(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(L_D, L_G, L_real) for a fresh batch and z, graphs attached."""
        tr = self.tr
        x = self.draws.real_batch().contiguous()  # the port's tensors are NCHW
        z = self.draws.sample_z()
        fake = tr.G(z)
        loss_real = ops.l1_recon_loss(x, tr.D(x))
        loss_fake_d = ops.l1_recon_loss(fake.detach(), tr.D(fake.detach()))
        loss_d = loss_real - self.k * loss_fake_d
        loss_g = ops.l1_recon_loss(fake, tr.D(fake))
        return loss_d, loss_g, loss_real

    def __call__(self) -> dict[str, float]:
        tr, cfg = self.tr, self.tr.cfg
        tr.opt_d.zero_grad()
        tr.opt_g.zero_grad()
        loss_d, loss_g, loss_real = self.losses()
        (loss_d + loss_g).backward()  # D also gets L_G's gradient (the port's bug)
        tr.opt_d.step()
        tr.opt_g.step()
        balance = (cfg.gamma * loss_real - loss_g).item()  # host sync, as in the port
        self.k = min(max(self.k + cfg.lambda_k * balance, 0.0), 1.0)
        tr.step += 1
        return {"loss_d": loss_d.item(), "loss_g": loss_g.item(), "k": self.k}
