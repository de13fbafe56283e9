"""Shared checks for the regulariser tests."""

import torch
import torch.nn.functional as F


def assert_fused_step_matches_eager(fused_net, fused, eager_net, eager, x, y):
    """One loss + penalty backward through the fused record equals the eager penalty's: the
    value and every parameter's gradient (fp32 tolerances). The forward must record the
    penalty and the call must consume the record."""
    out = fused_net(x)
    assert all(m._recorded_penalty is not None for m in fused.layers)  # the forward recorded its terms
    value = fused()
    assert all(m._recorded_penalty is None for m in fused.layers)  # consumed: the record was used
    (F.cross_entropy(out, y) + value).backward()
    ref = eager()
    (F.cross_entropy(eager_net(x), y) + ref).backward()
    torch.testing.assert_close(value, ref, rtol=1e-5, atol=1e-7)
    for a, b in zip(fused_net.parameters(), eager_net.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
