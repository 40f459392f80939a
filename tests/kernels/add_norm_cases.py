"""One add+norm case, run through an implementation and through the float64 reference."""
import math

import torch
from add_norm_reference import TOL, reference, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (residual?, residual_scale, out_scale, grad into new_residual?) — one per norm position's use:
CASES = {
    "final/peri-out": (False, 1.0, 1.0, False),       # plain norm
    "lns-first": (False, 1.0, 1 / math.sqrt(3), False),  # plain norm, scaled output
    "pre": (True, 1.0, 1.0, True),                    # sum carried on: both outputs get grads
    "lns": (True, 1.0, 1 / math.sqrt(5), True),
    "post": (True, 1.0, 1.0, False),                  # new residual dropped
    "deepnorm": (True, (2 * 12) ** 0.25, 1.0, False),
    "deepnorm+grad": (True, math.sqrt(8), 0.7, True),
}


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def run_case(impl, kind, dtype, shape, case, w_dtype=None, r_dtype=None, noncontig=False, seed=0):
    """Returns ({name: tensor} from `impl`, {name: float64 tensor} from the reference)."""
    has_res, a, c, grad_res = CASES[case]
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]

    def rand(*s, dt=dtype, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(DEVICE, dt)

    if noncontig:  # the last dim strided and the leading dims transposed
        x = rand(*shape[:-1][::-1], 2 * n).transpose(0, -2)[..., ::2]
    else:
        x = rand(*shape)
    r = rand(*shape, dt=r_dtype or dtype, scale=2.0) if has_res else None
    w = rand(n, dt=w_dtype or dtype, scale=0.5) + 1
    b = rand(n, dt=w_dtype or dtype, scale=0.1) if kind == "layernorm" else None
    # outputs take the promoted dtype of x and the residual, as unfused norm(x + residual) would
    out_dtype = dtype if r is None else torch.promote_types(dtype, r.dtype)
    gy = rand(*shape, dt=out_dtype)
    if noncontig:
        gy = gy.transpose(0, 1).contiguous().transpose(0, 1)
    gs = rand(*shape, dt=out_dtype) if grad_res else None
    assert not noncontig or not x.is_contiguous()

    inputs = {"x": x, "residual": r, "weight": w, "bias": b}
    got_leaves = {k: _leaf(v) for k, v in inputs.items() if v is not None}
    ref_leaves = {k: _leaf(v.double()) for k, v in inputs.items() if v is not None}

    def forward(fn, leaves):
        return fn(leaves["x"], leaves.get("residual"), leaves["weight"], leaves.get("bias"), 1e-6, a, c, kind)

    y, s = forward(impl, got_leaves)
    y_ref, s_ref = reference(*[ref_leaves.get(k) for k in ("x", "residual", "weight", "bias")], 1e-6, a, c, kind)
    assert y.dtype == out_dtype and y.shape == x.shape
    assert (s is None) == (not has_res) and (s is None or s.dtype == out_dtype)
    outs, grads = [y], [gy]
    outs_ref, grads_ref = [y_ref], [gy.double()]
    if gs is not None:
        outs += [s]
        grads += [gs]
        outs_ref += [s_ref]
        grads_ref += [gs.double()]
    torch.autograd.backward(outs, grads)
    torch.autograd.backward(outs_ref, grads_ref)

    got = {"y": y, **{f"d{k}": v.grad for k, v in got_leaves.items()}}
    ref = {"y": y_ref, **{f"d{k}": v.grad for k, v in ref_leaves.items()}}
    if has_res:
        got["s"], ref["s"] = s, s_ref
    for k, v in got_leaves.items():
        assert got[f"d{k}"].dtype == v.dtype, k  # each grad in its input's dtype
    return got, ref


def assert_close(got, ref, dtype, tol=None):
    tol = TOL[dtype] if tol is None else tol
    assert got.keys() == ref.keys()
    errors = {k: rel_err(got[k], ref[k]) for k in got}
    bad = {k: e for k, e in errors.items() if not e <= tol}
    assert not bad, f"relative errors over {tol:g}: {bad}"
