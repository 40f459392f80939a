from megatron_mixln.diagnostics.grad_norms import flatten_grad_norms, layer_grad_norms

__all__ = ["layer_grad_norms", "flatten_grad_norms"]
