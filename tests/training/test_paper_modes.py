"""Paper-faithful training modes against direct computations: --sample-mode truncate-pad (loss and
token counts over real tokens only), --eval-tokens (exactly N targets, token-weighted), --bf16-pure
(bf16 weights and Adam states, identical to a plain torch loop), and their bad-input errors."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training_testlib import tiny_datasets, tiny_model, tiny_train

from megatron_mixln.data import IndexedDatasetWriter
from megatron_mixln.training import trainer
from megatron_mixln.errors import UsageError
from megatron_mixln.training.config import TrainingConfig
from megatron_mixln.training.data import build_datasets
from megatron_mixln.training.model_setup import build_plain_model
from megatron_mixln.training.deepspeed_patches import innermost_optimizer


def _nll_sum(model, tokens: np.ndarray, n_targets: int) -> float:
    """Sum of next-token NLL over the first n_targets targets, computed on the unpadded prefix alone."""
    t = torch.as_tensor(tokens[:n_targets + 1], dtype=torch.int64)[None]
    with torch.no_grad():
        logits = model(t[:, :-1]).double()
    return F.cross_entropy(logits[0], t[0, 1:], reduction="sum").item()


@pytest.fixture()
def doc_prefix(tmp_path):
    rng = np.random.default_rng(5)
    prefix = str(tmp_path / "docs")
    with IndexedDatasetWriter(prefix, dtype=np.uint16) as w:
        for _ in range(40):
            w.add_document(rng.integers(1, 256, int(rng.integers(3, 40))))
    return prefix


def test_truncate_pad_masks_padding_in_loss_tokens_and_eval(single_rank, doc_prefix, tmp_path):
    mc = tiny_model()
    cfg = tiny_train(sample_mode="truncate-pad", data_path=[doc_prefix], split="80,20,0", train_iters=1,
                     eval_iters=2, clip_grad=0.0, run_dir=str(tmp_path / "run"))
    train_ds, valid_ds = build_datasets(cfg, mc.seq_length, 4, mc.vocab_size, pad_id=0)
    reference = build_plain_model(mc, cfg.seed, {})  # the weights step 1 starts from
    run = trainer.pretrain(mc, cfg)
    engine = run.engine
    # Step 1: ga = 2 micro-batches of 2 documents; each micro-batch's loss is the mean over its real targets.
    counts = [train_ds.num_tokens(i) - 1 for i in range(4)]
    sums = [_nll_sum(reference, train_ds[i]["tokens"], counts[i]) for i in range(4)]
    want = ((sums[0] + sums[1]) / (counts[0] + counts[1]) + (sums[2] + sums[3]) / (counts[2] + counts[3])) / 2
    assert any(c < mc.seq_length for c in counts)  # some samples really are padded
    assert run.history[0]["loss"] == pytest.approx(want, rel=1e-5)
    assert run.train_state["consumed_tokens"] == sum(counts)
    # Evaluation: token-weighted over the real targets of the first eval_iters x global batch documents.
    n_valid = 2 * 4
    v_counts = [valid_ds.num_tokens(i) - 1 for i in range(n_valid)]
    v_sum = sum(_nll_sum(engine.module, valid_ds[i]["tokens"], v_counts[i]) for i in range(n_valid))
    assert run.evals[-1]["valid_tokens"] == sum(v_counts)
    assert run.evals[-1]["valid_loss"] == pytest.approx(v_sum / sum(v_counts), rel=1e-5)
    engine.destroy()
    with open(tmp_path / "run" / "config.json") as fh:
        recorded = json.load(fh)["training"]
    assert recorded["sample_mode"] == "truncate-pad" and recorded["bf16_pure"] is False


def test_eval_tokens_scores_exactly_n_targets(single_rank):
    train, valid = tiny_datasets(n_valid=8)
    run = trainer.pretrain(tiny_model(), tiny_train(train_iters=1, eval_tokens=37), (train, valid))
    model = run.engine.module
    # 16 targets per sample: samples 0 and 1 whole, 5 targets of sample 2.
    total = sum(_nll_sum(model, valid[i]["tokens"], n) for i, n in enumerate([16, 16, 5]))
    assert run.evals[-1]["valid_tokens"] == 37
    assert run.evals[-1]["valid_loss"] == pytest.approx(total / 37, rel=1e-5)
    run.engine.destroy()


def test_bf16_pure_trains_bf16_weights_and_adam_states_like_a_torch_loop(single_rank):
    mc = tiny_model()
    train, valid = tiny_datasets()
    cfg = tiny_train(bf16_pure=True, optimizer="adam", train_iters=2, global_batch_size=2, eval_iters=0,
                     clip_grad=0.0, lr_warmup_iters=0, lr_decay_style="constant")
    run = trainer.pretrain(mc, cfg, (train, valid))
    engine = run.engine
    assert {p.dtype for p in engine.module.parameters()} == {torch.bfloat16}
    states = [s for s in innermost_optimizer(engine.optimizer).state.values()]
    assert states and all(s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.bfloat16 for s in states)
    assert not engine.bfloat16_enabled()  # DeepSpeed's mixed-precision wrapper (fp32 masters) is off

    # The same two steps as a plain torch loop on a bf16 model with torch's Adam.
    model = build_plain_model(mc, cfg.seed, {}).to(torch.bfloat16)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    for step in range(2):
        batch = torch.as_tensor(np.stack([train[i]["tokens"] for i in (2 * step, 2 * step + 1)]))
        loss = F.cross_entropy(model(batch[:, :-1]).float().flatten(0, 1), batch[:, 1:].flatten())
        assert run.history[step]["loss"] == pytest.approx(loss.item(), rel=1e-6)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for (name, got), want in zip(engine.module.state_dict().items(), model.state_dict().values()):
        assert torch.equal(got, want), name
    engine.destroy()


@pytest.mark.parametrize("kwargs, message", [
    (dict(bf16=True, bf16_pure=True), "--bf16 and --bf16-pure: give one"),
    (dict(bf16_pure=True, zero_stage=1), "--bf16-pure with --zero-stage 1"),
    (dict(sample_mode="packed"), "--sample-mode: unknown 'packed'; allowed: pack, truncate-pad"),
    (dict(eval_tokens=0), "--eval-tokens: must be > 0"),
    (dict(rollback_on_spike=2.0), "--rollback-on-spike needs --save and --save-interval"),
    (dict(rollback_on_spike=0.5, save="x", save_interval=2), "--rollback-on-spike: must be > 1"),
    (dict(sample_mode="truncate-pad", pipeline_model_parallel_size=2), "use --pipeline-model-parallel-size 1"),
])
def test_bad_mode_flags(kwargs, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace("+", r"\+")):
        TrainingConfig(**kwargs)


def test_truncate_pad_refuses_a_blend(doc_prefix):
    cfg = tiny_train(sample_mode="truncate-pad", data_path=["0.5", doc_prefix, "0.5", doc_prefix])
    with pytest.raises(UsageError, match="--data-path: --sample-mode truncate-pad takes one dataset prefix"):
        build_datasets(cfg, 16, 4)
