"""The whole model traces under torch.compile(fullgraph=True) on the triton backend.

fullgraph=True fails on any graph break, so this proves the custom ops (forward and
backward) and the backend dispatch are traceable. aot_eager keeps it fast on CPU (no C++
build); the kernels run in the Triton interpreter here and compiled on a GPU.
"""
import torch

from fastbegan import ops
from fastbegan.model import BEGAN

from testutil import DEVICE


def test_model_compiles_fullgraph_on_triton_backend():
    torch.manual_seed(0)
    m = BEGAN(16, filters=4, z_dim=6, h=5).to(DEVICE)
    z = (torch.rand(2, 6) * 2 - 1).to(DEVICE)

    def loss_fn(z):
        fake = m.G(z)
        return ops.l1_recon_loss(fake, m.D(fake))

    def grads(fn):
        m.zero_grad(set_to_none=True)
        loss = fn(z)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in m.parameters()]

    want_loss, want = grads(loss_fn)  # reference backend (conftest resets to torch)
    ops.set_backend("triton")
    got_loss, got = grads(torch.compile(loss_fn, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(got_loss, want_loss, atol=1e-5, rtol=1e-4)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-3)
