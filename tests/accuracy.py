"""The accuracy checks the kernel tests share.

A kernel in a 16-bit dtype cannot match a float32 reference exactly, and how far off it may be depends on the inputs;
PyTorch's own result in the same dtype, on the same inputs, measures that. The kernels must stay within k times its
error of the truth.
"""

import torch


def assert_within_torch_error(ours, truth, torch_result, k: float = 2.0, *, where=None, accumulate=torch.float32):
    """max |ours - truth| <= k * max |torch_result - truth| + floor, over the elements `where` selects (all without
    it): ours at most k times as far from the truth (fp32 or float64 math on the same rounded inputs) as PyTorch's own
    result in the kernel's dtype. The floor is one epsilon of the `accumulate` dtype (the kernels' fp32 accumulators)
    times the truth's largest magnitude: it decides only where PyTorch's own result happens to be exact."""
    truth = truth.double()
    ours, torch_result = ours.double(), torch_result.double()
    if where is not None:
        ours, truth, torch_result = ours[where], truth[where], torch_result[where]
    err, own = (ours - truth).abs().max().item(), (torch_result - truth).abs().max().item()
    floor = torch.finfo(accumulate).eps * truth.abs().max().item()
    assert err <= k * own + floor, f"error {err:.3e} > {k} x PyTorch's own {own:.3e} + {floor:.1e}"


def assert_argmax(z, idx, dtype):
    """The truth's logit z (R, V) at each returned index idx (R,) is the row's max, up to the rounding of the logits
    to the activation dtype (which the kernel does, as F.linear does): so ties, real or made by that rounding, pass."""
    top = z.max(-1).values
    eps = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
    assert (top - z.gather(-1, idx[:, None]).squeeze(-1) <= eps * top.abs().clamp(min=1)).all()
