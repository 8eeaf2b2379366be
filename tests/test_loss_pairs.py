"""Row pairs and weights for the soft-target CE op (ibot_fast/loss/pairs.py): ``pairs_to_table``
and ``cls_pairs`` against the loops they replace. (``masked_patch_rows`` is checked against its
formula in test_loss_ibot.py and against the adapters' weights in test_loss_compat.py.)"""
import pytest
import torch

from helpers import rel_err
from ibot_fast.fused_loss import soft_ce
from ibot_fast.loss import cls_pairs, pairs_to_table

RTOL = 1e-5
K = 37


def test_pairs_to_table_matches_loop_and_soft_ce():
    g = torch.Generator().manual_seed(0)
    M, T, R = 7, 5, 16
    st = torch.randint(0, M, (R,), generator=g)
    st[:3] = 2  # a row with several pairs
    st[st == 6] = 5  # a row without pairs
    tt = torch.randint(0, T, (R,), generator=g)
    w = torch.rand(R, generator=g) + 0.1
    partner, weight = pairs_to_table(st, tt, w, M)
    P = int(torch.bincount(st, minlength=M).max())
    assert partner.shape == weight.shape == (M, P)
    fill = [0] * M
    for r in range(R):  # the loop it replaces
        i = int(st[r])
        assert partner[i, fill[i]] == tt[r] and weight[i, fill[i]] == w[r]
        fill[i] += 1
    for i in range(M):
        assert torch.all(weight[i, fill[i]:] == 0) and torch.all(partner[i, fill[i]:] == 0)
    # with a given (larger) P nothing changes but the padding; and the loss is the pair sum
    partner9, weight9 = pairs_to_table(st, tt, w, M, P=P + 2)
    assert torch.equal(weight9[:, :P], weight) and torch.all(weight9[:, P:] == 0)
    s, t = torch.randn(M, K, generator=g), torch.randn(T, K, generator=g)
    c = torch.zeros(K)
    loss = soft_ce(s, t, partner9, weight9, c, 0.1, 0.04, backend="torch")
    flat = -(w.double()[:, None] * torch.softmax(t.double()[tt] / 0.04, -1)
             * torch.log_softmax(s.double()[st] / 0.1, -1)).sum()
    assert rel_err(loss, flat) < RTOL


def test_pairs_to_table_bad_input():
    st, tt, w = torch.tensor([0, 0, 1]), torch.tensor([1, 2, 3]), torch.ones(3)
    with pytest.raises(ValueError, match="more than P=1"):
        pairs_to_table(st, tt, w, M=2, P=1)
    with pytest.raises(ValueError, match="student_R has indices outside"):
        pairs_to_table(st, tt, w, M=1)
    with pytest.raises(ValueError, match="same length"):
        pairs_to_table(st, tt[:2], w, M=2)
    with pytest.raises(ValueError, match="student_R must be a 1-D integer"):
        pairs_to_table(st.float(), tt, w, M=2)


@pytest.mark.parametrize("ng,nc,B", [(2, 12, 3), (1, 3, 2), (2, 2, 1)])
def test_cls_pairs_matches_loop(ng, nc, B):
    """Student row v*B+b pairs with teacher rows q*B+b (q < ng), weight lambda1/((ng nc - ng) B)
    for q != v, 0 for the same view."""
    partner, weight = cls_pairs(ng, nc, B, dtype=torch.float64, scale=0.7)
    assert partner.shape == weight.shape == (nc * B, ng) and partner.dtype == torch.int64
    for v in range(nc):
        for b in range(B):
            for q in range(ng):
                assert partner[v * B + b, q] == q * B + b
                expect = 0.7 / ((ng * nc - ng) * B) if q != v else 0.0
                assert weight[v * B + b, q].item() == pytest.approx(expect, rel=1e-15)
    assert torch.count_nonzero(weight) == ng * nc * B - ng * B  # one dead pair per global row
