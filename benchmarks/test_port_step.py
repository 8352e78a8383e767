"""The port baseline is faithful: its gradients are those of one backward of L_D + L_G.

Checked against an independent computation: fastbegan's reference step
(``ReferenceStep.compute_grads``: D gets grad(L_D), G gets grad(L_G), same z) plus, for D only,
the gradient of L_G with respect to D's parameters, the port's known bug.
"""
import numpy as np
import torch

from fastbegan.data import procedural_faces
from fastbegan.step import ReferenceStep
from fastbegan.train import Trainer, TrainConfig

from port_step import PortStep


def _trainer(tmp_path):
    data = procedural_faces(16, 16, seed=1)[0]
    cfg = TrainConfig(res=16, filters=4, z_dim=8, h=8, batch_size=4, precision="fp32", backend="torch",
                      device="cpu", out=str(tmp_path), health_patience=0, seed=3)
    return Trainer(cfg, data, log=lambda *_: None)


def _grads(params):
    return [p.grad.detach().clone() for p in params]


def test_port_gradients_are_ld_plus_lg_into_d(tmp_path):
    t = _trainer(tmp_path)
    port = PortStep(t)
    port.k = 0.3
    gen_state = t.gen.get_state()
    for opt in (t.opt_d, t.opt_g):
        opt.zero_grad()
    loss_d, loss_g, _ = port.losses()
    (loss_d + loss_g).backward()
    port_d, port_g = _grads(t.D.parameters()), _grads(t.G.parameters())

    # the same batch and z again, through the reference step and a separate L_G -> D gradient
    t.gen.set_state(gen_state)
    t.k = torch.tensor(0.3)
    ref = ReferenceStep(t)
    x = ref.real_batch()
    z = ref.sample_z(4)
    ref.compute_grads(x, z)
    ref_d, ref_g = _grads(t.D.parameters()), _grads(t.G.parameters())
    fake = t.G(z).detach()
    lg_into_d = torch.autograd.grad((fake - t.D(fake)).abs().mean(), list(t.D.parameters()))

    # fp32, other summation orders (one backward vs two): 1e-4 relative
    for got, want in zip(port_g, ref_g):  # G: grad(L_G) only, as in fastbegan
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for got, want, extra in zip(port_d, ref_d, lg_into_d):  # D: grad(L_D) + grad(L_G)
        torch.testing.assert_close(got, want + extra, rtol=1e-4, atol=1e-5)
    # and the extra term is not negligible: the baseline really carries the bug
    assert sum(e.abs().sum().item() for e in lg_into_d) > 1e-3 * sum(w.abs().sum().item() for w in ref_d)


def test_port_step_updates_k_and_both_networks(tmp_path):
    t = _trainer(tmp_path)
    port = PortStep(t)
    before = [p.detach().clone() for p in t.model.parameters()]
    out = port()  # k_0 = 0, so L_D = L_real on this first step
    assert np.isfinite(out["loss_d"]) and np.isfinite(out["loss_g"])
    want = min(max(0.0 + t.cfg.lambda_k * (t.cfg.gamma * out["loss_d"] - out["loss_g"]), 0.0), 1.0)
    assert abs(out["k"] - want) < 1e-9
    assert t.step == 1
    assert all(not torch.equal(a, b) for a, b in zip(before, t.model.parameters()))
