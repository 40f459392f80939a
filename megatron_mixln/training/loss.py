"""Next-token cross entropy. In packed mode every token counts (Megatron's default: no loss mask, EOD
included), so every micro-batch carries the same number of tokens and a mean of per-micro-batch
means is the token-weighted mean. Padding (--sample-mode truncate-pad) and validation targets past
--eval-tokens are marked IGNORE in the batch and masked out of the loss and the token counts."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(batch, seq, vocab) logits, (batch, seq) labels -> (batch, seq) NLL in fp32.

    With tensor parallelism the logits are a vocab shard: swap in
    megatron_mixln.parallel.vocab_parallel_cross_entropy (see make_token_loss_fn).
    """
    vocab = logits.shape[-1]
    return F.cross_entropy(logits.float().reshape(-1, vocab), labels.reshape(-1), reduction="none").view_as(labels)


IGNORE = -1  # a batch entry that is no token: right padding, or a target past the evaluation budget


def split_batch(batch: torch.Tensor, pad_id: int = 0):
    """(micro, seq+1) int64 -> inputs (micro, seq), labels (micro, seq), mask (micro, seq) bool or None.

    IGNORE entries become `pad_id` in inputs and labels (right padding: under causal attention they
    only reach later, also masked, positions); mask is False where the label was IGNORE, None when
    the batch has no IGNORE entry (packed samples: every target counts).
    """
    if not bool((batch == IGNORE).any()):
        return batch[:, :-1], batch[:, 1:], None
    mask = batch[:, 1:] != IGNORE
    filled = batch.masked_fill(batch == IGNORE, pad_id)
    return filled[:, :-1], filled[:, 1:], mask


def masked_sum_and_count(nll: torch.Tensor, mask: torch.Tensor | None):
    """(sum of NLL over counted targets, number of counted targets) as fp32 tensors."""
    if mask is None:
        return nll.sum(), torch.tensor(float(nll.numel()), device=nll.device)
    m = mask.to(nll.dtype)
    return (nll * m).sum(), m.sum()


def mean_loss(nll: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The micro-batch loss: the plain mean (packed), or the mean over real targets (the reference's
    per-batch CrossEntropyLoss with ignored padding); 0 when nothing counts."""
    if mask is None:
        return nll.mean()
    total, count = masked_sum_and_count(nll, mask)
    return total / count.clamp(min=1.0)


def make_token_loss_fn(state=None):
    """Per-token loss for this run: plain CE, or the vocab-parallel one when TP > 1."""
    if state is not None and state.tp_size > 1:
        from megatron_mixln.training.distributed import parallel_api

        vocab_parallel_cross_entropy = parallel_api("vocab_parallel_cross_entropy", "--tensor-model-parallel-size")
        return lambda logits, labels: vocab_parallel_cross_entropy(logits, labels).float()
    return token_losses


def make_z_loss_fn(weight: float, state=None):
    """Per-token z-loss W * logsumexp(logits)^2 ((batch, seq) fp32), PaLM (arXiv 2204.02311 §5) and
    OLMo 2's auxiliary loss that keeps log Z near 0; vocab-parallel (TP-correct) when TP > 1.
    None when W == 0."""
    if not weight:
        return None
    from megatron_mixln.parallel.cross_entropy import vocab_parallel_logsumexp

    group = state.tp_group if state is not None and state.tp_size > 1 else None
    return lambda logits: weight * vocab_parallel_logsumexp(logits, group).pow(2)


class PipelineZLoss:
    """The pipeline engine's `loss_fn` with --z-loss-weight: mean vocab-parallel CE + mean z-loss of each
    micro-batch (on the last stage). It keeps the z-loss terms it added (detached) so that the trainer
    can log them apart (`pop_mean`); DeepSpeed only returns the total."""

    def __init__(self, weight: float, state=None):
        from megatron_mixln.parallel.cross_entropy import vocab_parallel_cross_entropy

        self.group = state.tp_group if state is not None and state.tp_size > 1 else None
        self.cross_entropy = vocab_parallel_cross_entropy
        self.z_loss = make_z_loss_fn(weight, state)
        self.terms: list[torch.Tensor] = []

    def __call__(self, logits_shard: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        ce = self.cross_entropy(logits_shard, labels, self.group).float().mean()
        if not torch.is_grad_enabled():  # evaluation (DeepSpeed's eval_batch): the NLL alone, as without PP
            return ce
        z = self.z_loss(logits_shard).mean()
        self.terms.append(z.detach().float())
        return ce + z

    def pop_mean(self) -> torch.Tensor | None:
        """Mean z-loss of the micro-batches since the last call (None on stages that compute no loss)."""
        terms, self.terms = self.terms, []
        return torch.stack(terms).mean() if terms else None
