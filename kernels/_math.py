"""Device helpers shared by the bounded-BN kernels: stable sigmoid pieces and position offsets.

For ``z`` (fp32 or fp64), with ``e = exp(-|z|)`` in ``(0, 1]``::

    s      = sigmoid(z)  = 1 / (1 + e)       (z >= 0)    e / (1 + e)   (z < 0)
    1 - s  = sigmoid(-z) = e / (1 + e)       (z >= 0)    1 / (1 + e)   (z < 0)
    log s  = logsigmoid(z) = min(z, 0) - log1p(e)

No ``exp`` of a positive number and no ``1 - s`` subtraction, so every piece keeps its relative
precision and stays finite for any finite ``z`` (|z| = 1e4 included). The receding penalty and its
derivative follow: ``p = s * (1 - log s)``, ``dp/dz = -log(s) * s * (1 - s)``.
"""

import triton
import triton.language as tl


@triton.jit
def log1p_unit(u):
    """``log(1 + u)`` for ``u`` in ``[0, 1]``, accurate for tiny ``u`` (Goldberg's correction)."""
    w = 1.0 + u
    d = w - 1.0
    # log(w) * u / (w - 1) cancels the rounding of 1 + u; for w == 1 exactly, log1p(u) = u.
    return tl.where(d == 0.0, u, tl.log(w) * (u / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def sigmoid_parts(z):
    """``(sigmoid(z), sigmoid(-z), logsigmoid(z))``, each computed stably."""
    e = tl.exp(-tl.abs(z))
    r = 1.0 / (1.0 + e)
    nonneg = z >= 0.0
    s = tl.where(nonneg, r, e * r)
    one_minus_s = tl.where(nonneg, e * r, r)
    log_s = tl.minimum(z, 0.0) - log1p_unit(e)
    return s, one_minus_s, log_s


@triton.jit
def position_offsets(offs_m, HW, s_n, s_hw, FLAT: tl.constexpr):
    """int64 element offsets of positions ``offs_m`` (int32) of a ``[N, C, HW]`` tensor.

    With ``FLAT`` the positions are evenly spaced and ``s_hw`` is that spacing (``s_n`` unused).
    """
    if FLAT:
        return offs_m.to(tl.int64) * s_hw
    else:
        n_idx = offs_m // HW
        hw_idx = offs_m - n_idx * HW
        return n_idx.to(tl.int64) * s_n + hw_idx.to(tl.int64) * s_hw


@triton.jit
def update_running(
    rmean_ptr, rvar_ptr, nbt_ptr, offs_c, mask_c, mean, var, n, momentum,
    CUMULATIVE: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """Running statistics as ``nn.BatchNorm2d`` updates them, for channels ``offs_c``::

        f = momentum   (or 1 / num_batches_tracked with CUMULATIVE: momentum=None)
        running_mean += f * (mean - running_mean)
        running_var  += f * (var * n / (n - 1) - running_var)      (n = 1: var)

    ``var`` is the biased batch variance over ``n`` positions; the caller has already incremented
    ``num_batches_tracked``.
    """
    if CUMULATIVE:
        f = 1.0 / tl.load(nbt_ptr).to(ACC)
    else:
        f = tl.zeros_like(mean) + momentum  # a float32 kernel argument (fp64 runs: 1e-8 rel.)
    unbiased = var * (n / tl.maximum(n - 1.0, 1.0))
    rm = tl.load(rmean_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)
    rv = tl.load(rvar_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)
    tl.store(rmean_ptr + offs_c, (rm + f * (mean - rm)).to(rmean_ptr.dtype.element_ty), mask=mask_c)
    tl.store(rvar_ptr + offs_c, (rv + f * (unbiased - rv)).to(rvar_ptr.dtype.element_ty), mask=mask_c)
