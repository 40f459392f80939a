from megatron_mixln.diagnostics.grad_norms import flatten_grad_norms, layer_grad_norms
from megatron_mixln.diagnostics.layer_analysis import angular_distances, hidden_states, layer_removal_drop, perplexity

__all__ = ["layer_grad_norms", "flatten_grad_norms", "angular_distances", "hidden_states", "layer_removal_drop",
           "perplexity"]
