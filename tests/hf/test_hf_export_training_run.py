"""Export straight from a real training run's --save directory: DeepSpeed ZeRO-3 (weights partitioned,
reassembled with DeepSpeed's zero_to_fp32), the run's tokenizer, and the model card's training facts."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from hf_testlib import load_hf, run_tool

ROOT = Path(__file__).resolve().parents[2]


class Tokens:
    def __init__(self, n, vocab, seed):
        self.t = np.random.default_rng(seed).integers(4, vocab, (n, 17), dtype=np.int64)

    def __len__(self):
        return len(self.t)

    def __getitem__(self, i):
        return {"tokens": self.t[i]}


def test_export_of_a_zero3_run(tmp_path, spm_model, single_rank):
    import deepspeed

    from megatron_mixln.model import ModelConfig
    from megatron_mixln.training.config import TrainingConfig
    from megatron_mixln.training.trainer import pretrain

    config = ModelConfig(vocab_size=384, hidden_size=32, ffn_hidden_size=48, num_layers=2, num_attention_heads=4,
                         num_query_groups=2, seq_length=16, norm_position="mix", post_ln_layers=1)
    cfg = TrainingConfig(micro_batch_size=2, global_batch_size=2, train_iters=3, lr=1e-2, eval_iters=1,
                         eval_interval=3, log_interval=1, grad_norm_interval=0, seed=5, zero_stage=3,
                         save=str(tmp_path / "run"), tokenizer=spm_model)
    summary = pretrain(config, cfg, (Tokens(16, 384, 0), Tokens(4, 384, 1)))
    engine = summary.engine
    try:
        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params):
            trained = {k: v.detach().clone().float() for k, v in engine.module.state_dict().items()}
    finally:
        engine.destroy()
    code, out, err = run_tool("convert_to_hf", "--checkpoint", str(tmp_path / "run"), "--output", str(tmp_path / "hf"))
    assert code == 0, err
    info = json.loads(out)
    assert info["source"]["zero_stage"] == 3 and info["source"]["tag"] == "iter_0000003"
    assert "tokenizer.model" in info["tokenizer"]  # the run's --tokenizer
    from megatron_mixln.model import build_model

    model = build_model(config)
    model.load_state_dict(trained)
    hf = load_hf(tmp_path / "hf")
    tokens = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(tokens).logits - model.eval()(tokens)).abs().max() <= 1e-5
    # A padded batch generates what each text generates alone: the tokenizer pads on the left
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    texts = ["the model", "a longer prompt than the first one, with more tokens"]
    batch = tok(texts, return_tensors="pt", padding=True)
    assert tok.padding_side == "left" and (batch["attention_mask"][0] == 0).any()
    with torch.no_grad():
        together = hf.generate(**batch, max_new_tokens=4, do_sample=False)[:, batch["input_ids"].shape[1]:]
        for row, text in enumerate(texts):
            alone = tok(text, return_tensors="pt")
            out = hf.generate(**alone, max_new_tokens=4, do_sample=False)[0, alone["input_ids"].shape[1]:]
            assert out.tolist() == together[row].tolist(), (text, out, together[row])
    card = (tmp_path / "hf" / "README.md").read_text()
    valid = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ppl = [r["valid_ppl"] for r in valid if "valid_ppl" in r][-1]
    assert f"| tokens trained | {3 * 2 * 16} |" in card and f"{ppl:.4g}" in card and "| iterations trained | 3 |" in card

    # tools/analyze_layers.py reads the same ZeRO-3 run (checkpoint.reader.read_full_state_dict, as the export)
    from megatron_mixln.data import IndexedDatasetWriter
    from megatron_mixln.diagnostics import angular_distances

    with IndexedDatasetWriter(str(tmp_path / "tokens"), dtype=np.uint16) as w:
        for doc in Tokens(8, 384, 2).t:
            w.add_document(doc)
    code = subprocess.run([sys.executable, str(ROOT / "tools/analyze_layers.py"), "--checkpoint", str(tmp_path / "run"),
                           "--data-path", str(tmp_path / "tokens"), "--seq-length", "8", "--num-samples", "4",
                           "--micro-batch-size", "4", "--out", str(tmp_path / "layers")],
                          capture_output=True, text=True, timeout=300)
    assert code.returncode == 0, code.stderr
    result = json.loads((tmp_path / "layers" / "layer_analysis.json").read_text())
    assert result["positions"] == ["post", "pre"]
    from megatron_mixln.data import build_train_valid_test_datasets

    data, _, _ = build_train_valid_test_datasets([str(tmp_path / "tokens")], "1,0,0", 8, 1234, (4, 0, 0), None)
    batch = torch.from_numpy(np.stack([data[i]["tokens"] for i in range(4)]))
    d = angular_distances(model, [batch])
    assert math.isclose(result["angular_distance"][0][1], d[0, 1].item(), rel_tol=1e-5)


def test_export_of_a_tensor_parallel_zero3_checkpoint(tmp_path):
    """TP=2 x ZeRO-3: DeepSpeed's zero_to_fp32 per TP rank, then the TP shards merged: the original weights."""
    from safetensors.torch import load_file
    from spawn_testlib import run_spawned

    from hf_jobs import ZERO3_TP2_CASE, zero3_tp2_save_job
    from hf_testlib import tiny_model
    from megatron_mixln.hf.mapping import to_hf_state_dict

    results = run_spawned(zero3_tp2_save_job, 2, str(tmp_path / "ckpt"))
    assert all(r["partitioned"] for r in results)
    (tmp_path / "ckpt" / "latest").write_text("iter_0000001")
    names = sorted(p.name for p in (tmp_path / "ckpt" / "iter_0000001").iterdir())
    assert "zero_pp_rank_0_mp_rank_01_model_states.pt" in names
    code, out, err = run_tool("convert_to_hf", "--checkpoint", str(tmp_path / "ckpt"), "--output", str(tmp_path / "hf"))
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["source"] == {"format": "deepspeed", "zero_stage": 3,
                                                                  "tag": "iter_0000001", "tp": 2}
    config, model = tiny_model(**ZERO3_TP2_CASE)
    expected = to_hf_state_dict(model.state_dict(), config)
    got = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
