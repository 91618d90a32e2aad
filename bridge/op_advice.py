"""What to tell a user whose hook calls a torch function the registry does not have: the
function's name as they wrote it and the nearest spelling that works remotely."""
from __future__ import annotations

import difflib


from hookwire.ops import CLIENT_OPS, INPLACE_OPS

# Functions people reach for, and the supported way to get the same result.
SUGGESTIONS = {
    "torch.take": "x.flatten()[index]",
    "torch.equal": "(a == b).all() kept as a tensor (a Python bool cannot steer a traced "
                   "hook), or compare after the run",
    "torch.allclose": "torch.isclose(a, b).all() kept as a tensor, or compare after the run",
    "Tensor.allclose": "torch.isclose(a, b).all() kept as a tensor, or compare after the run",
    "Tensor.equal": "(a == b).all() kept as a tensor, or compare after the run",
    "torch.tensor_split": "torch.split(x, sizes, dim) with the sizes worked out from the shape",
    "Tensor.tensor_split": "x.split(sizes, dim) with the sizes worked out from the shape",
    "Tensor.unfold": "slices stacked with torch.stack([x[..., i:i + size] for i in "
                     "range(0, n - size + 1, step)], dim=-2)",
    "Tensor.as_strided": "indexing, view/reshape, permute or expand (arbitrary strides can "
                         "reach memory outside the tensor)",
    "torch.as_strided": "indexing, view/reshape, permute or expand (arbitrary strides can "
                        "reach memory outside the tensor)",
    "Tensor.take": "x.flatten()[index]",
    "torch.take_along_dim": "torch.gather(x, dim, index)",
    "Tensor.take_along_dim": "torch.gather(x, dim, index)",
    "torch.index_fill": "x.index_put((index,), torch.tensor(value)) or torch.where",
    "Tensor.index_fill": "x.index_put((index,), torch.tensor(value)) or torch.where",
    "Tensor.index_fill_": "x.index_put_((index,), torch.tensor(value))",
    "Tensor.masked_scatter": "torch.where(mask, source, x) with source shaped like x",
    "Tensor.masked_scatter_": "torch.where(mask, source, x) with source shaped like x",
    "torch.repeat_interleave": "x.unsqueeze(dim + 1).expand(...).flatten(dim, dim + 1) for a "
                               "constant repeat count",
    "Tensor.repeat_interleave": "x.unsqueeze(dim + 1).expand(...).flatten(dim, dim + 1) for a "
                                "constant repeat count",
    "torch.nn.functional.embedding": "weight[ids] or torch.index_select(weight, 0, ids)",
    "torch.kthvalue": "torch.sort(x, dim).values.select(dim, k - 1) or torch.topk",
    "Tensor.kthvalue": "torch.sort(x, dim).values.select(dim, k - 1) or torch.topk",
    "torch.cummax": "torch.sort or a loop of torch.maximum over slices",
    "torch.msort": "torch.sort(x, dim=0).values",
    "torch.logcumsumexp": "torch.log(torch.cumsum(torch.exp(x - m), dim)) + m with "
                          "m = x.amax(dim, keepdim=True)",
    "torch.var_mean": "torch.var(x, dim) and torch.mean(x, dim)",
    "torch.std_mean": "torch.std(x, dim) and torch.mean(x, dim)",
    "torch.aminmax": "x.amin(dim) and x.amax(dim)",
    "Tensor.aminmax": "x.amin(dim) and x.amax(dim)",
    "torch.linalg.inv": "torch.linalg.svd (A^-1 = Vh^T diag(1/S) U^T) or solve locally",
    "torch.inverse": "torch.linalg.svd (A^-1 = Vh^T diag(1/S) U^T) or solve locally",
    "torch.linalg.pinv": "torch.linalg.svd (pinv = Vh^T diag(1/S) U^T)",
    "torch.pinverse": "torch.linalg.svd (pinv = Vh^T diag(1/S) U^T)",
    "torch.linalg.det": "torch.linalg.svdvals (|det| = prod(S)) or torch.linalg.qr",
    "torch.det": "torch.linalg.svdvals (|det| = prod(S)) or torch.linalg.qr",
    "torch.linalg.slogdet": "torch.linalg.svdvals(x).log().sum(-1) for log|det|",
    "torch.linalg.eig": "torch.linalg.eigh for symmetric matrices",
    "torch.linalg.eigvals": "torch.linalg.eigvalsh for symmetric matrices",
    "torch.linalg.matrix_rank": "(torch.linalg.svdvals(x) > tol).sum(-1)",
    "torch.qr": "torch.linalg.qr",
    "Tensor.qr": "torch.linalg.qr",
    "torch.fft.fftn": "torch.fft.fft along each dim in turn",
    "torch.fft.fft2": "torch.fft.fft along each of the two dims in turn",
    "torch.fft.rfftn": "torch.fft.rfft and torch.fft.fft along the other dims",
    "torch.cumulative_trapezoid": "torch.cumsum of (x[1:] + x[:-1]) / 2",
    "torch.trapezoid": "((x[1:] + x[:-1]) / 2).sum()",
    "torch.histc": "torch.bucketize(x, boundaries) and torch.nn.functional.one_hot(...).sum(0)",
    "torch.bincount": "torch.nn.functional.one_hot(x, n).sum(0)",
    "torch.nn.functional.kl_div": "(target * (target.log() - input)).sum() with log-probs",
    "torch.nn.functional.binary_cross_entropy_with_logits":
        "-(y * F.logsigmoid(x) + (1 - y) * F.logsigmoid(-x)).mean() (via softplus: "
        "F.softplus(x) - x * y)",
    "torch.nn.functional.log_sigmoid": "-F.softplus(-x)",
    "torch.nn.functional.relu6": "x.clamp(0, 6)",
    "torch.nn.functional.hardtanh": "x.clamp(min_val, max_val)",
    "torch.nn.functional.mish": "x * torch.tanh(F.softplus(x))",
    "torch.nn.functional.elu": "torch.where(x > 0, x, alpha * torch.expm1(x))",
    "torch.nn.functional.glu": "a, b = x.chunk(2, dim); a * torch.sigmoid(b)",
    "torch.nn.functional.rms_norm": "x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) "
                                    "* weight",
    "torch.nn.functional.group_norm": "reshape into groups and use mean/var",
    "torch.nn.functional.embedding_bag": "index_select then sum/mean",
    "torch.tensordot": "torch.einsum",
    "torch.kron": "torch.einsum('ij,kl->ikjl', a, b).reshape(...)",
    "torch.block_diag": "torch.zeros and index assignment",
    "torch.cross": "torch.stack of the three component products",
    "torch.linalg.cross": "torch.stack of the three component products",
    "torch.trace": "x.diagonal().sum()",
    "Tensor.trace": "x.diagonal().sum()",
    "torch.diag": "x.diagonal() (matrix to vector), or torch.eye(n) * v (vector to matrix)",
    "Tensor.diag": "x.diagonal()",
    "torch.diag_embed": "torch.eye(n) * v.unsqueeze(-1)",
    "torch.addmm": "bias + a @ b",
    "torch.baddbmm": "bias + torch.bmm(a, b)",
    "torch.addcmul": "x + value * a * b",
    "torch.addcdiv": "x + value * a / b",
    "torch.lerp": "start + weight * (end - start)",
    "Tensor.lerp": "start + weight * (end - start)",
    "torch.sinh": "(torch.exp(x) - torch.exp(-x)) / 2",
    "torch.cosh": "(torch.exp(x) + torch.exp(-x)) / 2",
    "torch.tan": "torch.sin(x) / torch.cos(x)",
    "torch.asin": "torch.atan2(x, torch.sqrt(1 - x * x))",
    "torch.acos": "torch.atan2(torch.sqrt(1 - x * x), x)",
    "torch.atan": "torch.atan2(x, torch.ones_like(x))",
    "torch.logit": "torch.log(p / (1 - p))",
    "torch.special.logit": "torch.log(p / (1 - p))",
    "torch.heaviside": "torch.where(x > 0, 1.0, torch.where(x == 0, values, 0.0))",
    "torch.unique_consecutive": "save the tensor and call it after the run",
}


def display_name(func) -> str:
    """A torch callable as a user writes it: ``torch.take``, ``Tensor.take``,
    ``torch.linalg.det``, ``torch.nn.functional.embedding``."""
    owner = getattr(func, "__self__", None)
    if getattr(func, "__name__", None) == "__get__" and hasattr(owner, "__objclass__"):
        return "Tensor." + owner.__name__  # a property: x.T, x.mT, x.real
    qualname = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
    name = getattr(func, "__name__", qualname)
    module = getattr(func, "__module__", None) or ""
    if qualname.startswith(("TensorBase.", "Tensor.", "_TensorBase.")):
        return "Tensor." + qualname.split(".", 1)[1]
    for prefix, namespace in (("linalg_", "torch.linalg."), ("fft_", "torch.fft."),
                              ("special_", "torch.special.")):
        if module.startswith(("torch._C._linalg", "torch._C._fft", "torch._C._special")) and \
                name.startswith(prefix):
            return namespace + name[len(prefix):]
    if module in ("torch._C._nn", "torch.nn.functional"):
        return "torch.nn.functional." + name
    if module.startswith("torch") and (qualname.startswith("_VariableFunctionsClass.") or
                                       module in ("torch", "torch.functional")):
        return "torch." + name
    return f"{module}.{qualname}" if module else qualname


def _supported_names() -> list[str]:
    return sorted({display_name(f) for f in list(CLIENT_OPS) + list(INPLACE_OPS)})


def unsupported_advice(func) -> str:
    """Why ``func`` cannot run remotely and what to write instead."""
    name = display_name(func)
    base = "it is not in hookwire's registry of allowed operations (hookwire.ops.OPS)"
    if name in SUGGESTIONS:
        return f"{base}; write {SUGGESTIONS[name]} instead"
    short = name.rsplit(".", 1)[-1]
    names = _supported_names()
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.75) or [
        n for n in names if n.rsplit(".", 1)[-1] in difflib.get_close_matches(
            short, [m.rsplit(".", 1)[-1] for m in names], n=3, cutoff=0.8)][:3]
    if close:
        return f"{base}; the nearest supported: {', '.join(close)}"
    return base


__all__ = ["SUGGESTIONS", "display_name", "unsupported_advice"]

