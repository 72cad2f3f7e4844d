"""The default BLL loss (fixed-variance Gaussian, mean propagation, prototype likelihood
with the sampling-free bound, predictive heads) recomputed by hand in numpy.

Nothing here goes through the library's families, messages or ELBO: the forward network
is run module by module, and every term is written out from the Gaussian formulas:

    rho_k = N((a + b_y) / 2, sigma^2 / 2)                     (product of two Gaussians)
    KL(rho || alpha) = (1/2) (s_r^2 / s^2 + (m_r - a)^2 / s^2 - 1 - log(s_r^2 / s^2))
    E_rho log N(z; b_y, s^2) = -(1/2) log(2 pi s^2) - ((m_r - b_y)^2 + s_r^2) / (2 s^2)
    log E_rho N(z; b_c, s^2) = log N(m_r; b_c, s^2 + s_r^2)
    bound = sum_C E_rho log N(z; b_y, s^2) - logsumexp_c sum_C log E_rho N(z; b_c, s^2)

(the prototype likelihood is q(y = c | z) = softmax_c sum_C log N(z; b_c, sigma^2)).
"""

import numpy as np
import torch
from scipy.special import logsumexp

from pyro_bll import make_family
from pyro_bll.methods import BLL
from pyro_bll.run.options import RunConfig

from utils import assert_close, mlp_chain

SIGMA = 1.3


def _log_normal(z, mu, var):
    return -0.5 * np.log(2 * np.pi * var) - (z - mu) ** 2 / (2 * var)


def test_every_term_of_the_default_loss_by_hand():
    torch.manual_seed(0)
    chain = mlp_chain(make_family("gaussian", sigma=SIGMA)).double()
    with torch.no_grad():
        for layer in chain.feedback.layers:
            layer.weight.normal_(0, 1.0)
    x = torch.randn(8, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (8,))
    _, logs = BLL(chain, RunConfig(pred_weight=1.0)).loss(chain, x, y, None)

    s2 = SIGMA**2
    h, yy = x, y.numpy()
    for k in range(chain.num_blocks):
        a_t = chain.blocks[k](h)  # [B, C]: the block's mean output
        a = a_t.detach().numpy()
        if k == chain.num_blocks - 1:  # the head's cross-entropy only, no latent
            logits = chain.head(a_t).detach().numpy()
            ce = -(logits[np.arange(8), yy] - logsumexp(logits, axis=-1))
            assert_close(logs["kl"][k], 0.0, atol=0)
            assert_close(logs["likelihood"][k], ce.mean(), atol=1e-9, rtol=1e-9)
            break
        protos = chain.feedback.layers[k].weight.detach().numpy()  # b_c, [V, C]
        b = protos[yy]  # [B, C]
        m_r, s2_r = (a + b) / 2, s2 / 2
        kl = 0.5 * (s2_r / s2 + (m_r - a) ** 2 / s2 - 1 - np.log(s2_r / s2)).sum(-1)
        e_log_y = (-0.5 * np.log(2 * np.pi * s2) - ((m_r - b) ** 2 + s2_r) / (2 * s2)).sum(-1)
        log_mgf = _log_normal(m_r[:, None, :], protos[None], s2 + s2_r).sum(-1)  # [B, V]
        bound = e_log_y - logsumexp(log_mgf, axis=-1)
        pred = chain.pred_heads[k](a_t).detach().numpy()
        pred_ce = -(pred[np.arange(8), yy] - logsumexp(pred, axis=-1))
        assert_close(logs["kl"][k], kl.mean(), atol=1e-9, rtol=1e-9)
        assert_close(logs["likelihood"][k], -bound.mean(), atol=1e-9, rtol=1e-9)
        assert_close(logs["pred"][k], pred_ce.mean(), atol=1e-9, rtol=1e-9)
        assert_close(logs["loss"][k], kl.mean() - bound.mean() + pred_ce.mean(), atol=1e-9)
        h = a_t  # mean propagation
