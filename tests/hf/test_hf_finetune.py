"""Fine-tuning an export with transformers.Trainer: the loss falls, and the saved model reloads with identical logits."""
import torch

from hf_testlib import load_hf, run_tool, save_tiny

PAIRS = [("add two and three", "five"), ("name the first post layer", "layer one"), ("say the norm", "rmsnorm"),
         ("what comes after pre", "post"), ("count to three", "one two three"), ("repeat mix", "mix mix")]


def _dataset(tok, length=64):
    rows = []
    for instruction, response in PAIRS:
        prompt = tok(f"Instruction: {instruction}\nResponse:", add_special_tokens=False).input_ids
        answer = tok(" " + response, add_special_tokens=False).input_ids + [tok.eos_token_id]
        ids = prompt + answer
        assert len(ids) <= length
        pad = length - len(ids)
        rows.append({"input_ids": torch.tensor(ids + [tok.pad_token_id] * pad),
                     "attention_mask": torch.tensor([1] * len(ids) + [0] * pad),
                     "labels": torch.tensor([-100] * len(prompt) + answer + [-100] * pad)})
    return rows


def test_trainer_fine_tunes_an_export(tmp_path, spm_model):
    from transformers import AutoTokenizer, Trainer, TrainingArguments

    save_tiny(tmp_path / "plain", norm_position="mix", post_ln_layers=1, num_query_groups=2)
    assert run_tool("convert_to_hf", "--checkpoint", str(tmp_path / "plain"), "--output", str(tmp_path / "hf"),
                    "--tokenizer", spm_model)[0] == 0
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True)
    model = load_hf(tmp_path / "hf").train()
    data = _dataset(tok)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=12, per_device_train_batch_size=3,
                             learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
                             report_to=[], use_cpu=True, seed=0, data_seed=0, activation_checkpointing=True,
                             dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses
    trainer.save_model(str(tmp_path / "tuned"))
    tok.save_pretrained(str(tmp_path / "tuned"))
    reloaded = load_hf(tmp_path / "tuned")
    assert type(reloaded).__name__ == "MixLNLlamaForCausalLM"
    batch = torch.stack([r["input_ids"] for r in data])
    mask = torch.stack([r["attention_mask"] for r in data])
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(batch, attention_mask=mask).logits, reloaded(batch, attention_mask=mask).logits)
