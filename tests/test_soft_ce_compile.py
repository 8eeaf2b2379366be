"""``torch.compile`` sees the Triton back end of ``soft_ce`` / ``soft_ce_linear`` as ops: a
function calling them traces to one graph with no breaks, and no temperature is read back by
the host (a ``Tensor.item()`` inside the step would be a graph break and a sync per call).

On the CPU the kernels run under the Triton interpreter (``TRITON_INTERPRET=1``, set by
``conftest.py``); on a CUDA host they are compiled. The compiler back end here only counts
graphs and runs them as traced (no inductor), so the test costs a trace, not a compile.
"""
import os

import pytest
import torch
import torch.nn.functional as F

from ibot_fast.kernels import soft_ce, soft_ce_linear

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEV == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
    reason="the Triton back end on the CPU needs TRITON_INTERPRET=1 set before triton is "
           "imported (tests/conftest.py does it)")
pytest.importorskip("triton")


def _one_graph(fn, *args):
    """``fn(*args)`` compiled with ``fullgraph=True`` (any graph break raises, naming its
    reason) by a back end that counts the graphs and runs them as traced."""
    torch._dynamo.reset()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    out = torch.compile(fn, backend=counting_backend, fullgraph=True)(*args)
    assert len(graphs) == 1, f"{len(graphs)} graphs"
    return out


def _pairs(M=13, T=9, K=37, P=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(T, K, generator=g)
    c = torch.randn(K, generator=g) * 0.1
    partner = torch.randint(0, T, (M, P), generator=g)
    w = torch.rand(M, P, generator=g) + 0.1
    w[3] = 0.0
    return [x.to(DEV) for x in (t, c, partner, w)]


def test_soft_ce_triton_is_one_graph_with_a_tensor_teacher_temp():
    """The compiled step passes the per-epoch teacher temperature as a 0-dim tensor."""
    t, c, partner, w = _pairs()
    lin = torch.nn.Linear(8, t.shape[1]).to(DEV)
    z = torch.randn(partner.shape[0], 8, device=DEV)
    tau_t = torch.tensor(0.04, device=DEV)

    def loss_fn(z, tau_t, inplace):
        return soft_ce(lin(z), t, partner, w, c, 0.1, tau_t, backend="triton", block_k=16,
                       inplace_grad=inplace)

    for inplace in (False, True):
        loss = _one_graph(loss_fn, z, tau_t, inplace)
        lin.zero_grad()
        loss.backward()
        got = lin.weight.grad.clone()
        lin.zero_grad()
        ref = soft_ce(lin(z), t, partner, w, c, 0.1, 0.04, backend="torch")
        ref.backward()
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got, lin.weight.grad, rtol=1e-5, atol=1e-6)


def test_soft_ce_linear_triton_is_one_graph_with_tensor_temps():
    t, c, partner, w = _pairs()
    M, T, K, D = partner.shape[0], t.shape[0], t.shape[1], 16
    g = torch.Generator().manual_seed(1)
    zs, zt = (F.normalize(torch.randn(n, D, generator=g), dim=-1).to(DEV) for n in (M, T))
    ws, wt = (F.normalize(torch.randn(K, D, generator=g), dim=-1).to(DEV) for _ in range(2))
    tau_s, tau_t = torch.tensor(0.1, device=DEV), torch.tensor(0.04, device=DEV)

    def loss_fn(zs, ws, tau_s, tau_t):
        return soft_ce_linear(zs, ws, zt, wt, partner, w, c, tau_s, tau_t, backend="triton",
                              block_k=16, block_m=16)

    a, b = zs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
    loss = _one_graph(loss_fn, a, b, tau_s, tau_t)
    loss.backward()
    x, y = zs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
    ref = soft_ce_linear(x, y, zt, wt, partner, w, c, 0.1, 0.04, backend="torch")
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    # the Triton dots run in TF32 on a GPU; the interpreter computes in fp32
    tol = dict(rtol=1e-5, atol=1e-5) if DEV == "cpu" else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(a.grad, x.grad, **tol)
    torch.testing.assert_close(b.grad, y.grad, **tol)
