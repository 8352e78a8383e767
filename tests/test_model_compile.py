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


def test_triton_backend_trains_like_the_reference(tmp_path):
    """A few training steps of the Trainer on the triton backend (interpreter on CPU) give
    the reference backend's losses, k_t and parameters, within fp32 tolerance."""
    from fastbegan.data import procedural_faces
    from fastbegan.train import Trainer, TrainConfig

    data = procedural_faces(8, 8, seed=0)[0]
    runs = {}
    for backend in ("torch", "triton"):
        cfg = TrainConfig(res=8, filters=4, z_dim=6, h=5, batch_size=2, steps=3, device=DEVICE,
                          backend=backend, out=str(tmp_path / backend), gamma=0.9, lambda_k=0.05,
                          precision="fp32", reference_step=True)
        t = Trainer(cfg, data, log=lambda *_: None)
        rows = [t.train_step() for _ in range(3)]
        runs[backend] = (t, [{k: v.item() for k, v in r.items()} for r in rows])
    (ref, ref_rows), (tri, tri_rows) = runs["torch"], runs["triton"]
    for a, b in zip(tri_rows, ref_rows):
        for key in ("loss_real", "loss_fake", "k", "M"):
            assert abs(a[key] - b[key]) <= 1e-5 + 1e-4 * abs(b[key]), (key, a, b)
    assert ref_rows[-1]["k"] > 0  # k_t moved, so its update was exercised
    for (name, p), q in zip(ref.model.named_parameters(), tri.model.parameters()):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-4, msg=name)
