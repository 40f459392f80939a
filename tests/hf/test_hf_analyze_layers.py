"""tools/analyze_layers.py on HF directories: any HF LLaMA (perplexity, angular distance, layer removal)
and --lm-eval-tasks (the drop per removed layer), against this stack's model computed directly."""
import json

import numpy as np
import pytest
import torch

from hf_testlib import hand_accuracy, run_tool, save_tiny, write_mc_task


def test_analyze_layers_on_a_stock_hf_llama(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_mixln.data import IndexedDatasetWriter, build_train_valid_test_datasets
    from megatron_mixln.diagnostics import layer_removal_drop, perplexity
    from megatron_mixln.hf.hf_import import read_hf_model
    from megatron_mixln.model import build_model

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(str(tmp_path / "hf"))
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(str(tmp_path / "tokens"), dtype=np.uint16) as w:
        for _ in range(20):
            w.add_document(rng.integers(0, 64, 30))
    code, out, err = run_tool("analyze_layers", "--checkpoint", str(tmp_path / "hf"), "--data-path", str(tmp_path / "tokens"),
                              "--seq-length", "8", "--num-samples", "6", "--micro-batch-size", "3", "--device", "cpu",
                              "--out", str(tmp_path / "out"))
    assert code == 0, err
    result = json.loads((tmp_path / "out/layer_analysis.json").read_text())
    assert result["positions"] == ["pre"] * 3
    plain, config = read_hf_model(str(tmp_path / "hf"))
    model = build_model(config)
    model.load_state_dict(plain)
    data, _, _ = build_train_valid_test_datasets([str(tmp_path / "tokens")], "1,0,0", 8, 1234, (6, 0, 0), None)
    tokens = torch.from_numpy(np.stack([data[i]["tokens"] for i in range(6)]))
    batches = [tokens[:3], tokens[3:]]
    assert result["perplexity"] == pytest.approx(perplexity(model.eval(), batches), rel=1e-6)
    assert [r["drop"] for r in result["layer_removal"]] == pytest.approx(
        [r["drop"] for r in layer_removal_drop(model, batches)], rel=1e-5)


def test_lm_eval_drop_per_removed_layer(tmp_path, spm_model):
    """Full-model and per-removed-layer accuracies equal those computed by hand with this stack's model."""
    from transformers import AutoTokenizer

    config, model = save_tiny(tmp_path / "plain", norm_position="mix", post_ln_layers=1, num_layers=2)
    assert run_tool("convert_to_hf", "--checkpoint", str(tmp_path / "plain"), "--output", str(tmp_path / "hf"),
                    "--tokenizer", spm_model)[0] == 0
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True)
    answers = [0, 1, 0, 1, 2]
    tasks = write_mc_task(tmp_path / "tasks", answers)
    # a training checkpoint goes through a temporary export (tokenizer given); the HF dir is used as it is
    code, out, err = run_tool("analyze_layers", "--checkpoint", str(tmp_path / "plain"), "--tokenizer", spm_model,
                              "--lm-eval-tasks", "tiny_mc", "--lm-eval-include", tasks, "--out", str(tmp_path / "out"))
    assert code == 0, err
    res = json.loads((tmp_path / "out/layer_analysis.json").read_text())["lm_eval"]
    full_acc = hand_accuracy(model, tok, answers)[0]
    assert res["full"]["tiny_mc"]["acc"] == pytest.approx(full_acc)
    layers = model.layers
    for row, i in zip(res["layers"], range(len(layers))):
        model.layers = torch.nn.ModuleList(b for j, b in enumerate(layers) if j != i)
        acc = hand_accuracy(model, tok, answers)[0]
        model.layers = layers
        assert row["layer"] == i + 1 and row["position"] == ("post" if i == 0 else "pre")
        assert row["scores"]["tiny_mc"]["acc"] == pytest.approx(acc)
        assert row["delta"]["tiny_mc"]["acc"] == pytest.approx(acc - full_acc)
    assert "without layer  1 (post" in out


def test_remote_code_runs_only_when_it_is_this_projects_export(tmp_path, spm_model):
    """trust_remote_code only for this version's own modeling file: a tampered copy is never executed."""
    import shutil

    from megatron_mixln.hf.remote_code import remote_code_verdict

    save_tiny(tmp_path / "plain", norm_position="mix", post_ln_layers=1, num_layers=2)
    assert run_tool("convert_to_hf", "--checkpoint", str(tmp_path / "plain"), "--output", str(tmp_path / "hf"),
                    "--tokenizer", spm_model)[0] == 0
    assert remote_code_verdict(str(tmp_path / "hf")) == (True, None)
    save_tiny(tmp_path / "plain-pre", num_layers=2)  # stock LlamaForCausalLM: no custom code at all
    assert run_tool("convert_to_hf", "--checkpoint", str(tmp_path / "plain-pre"), "--output", str(tmp_path / "pre"))[0] == 0
    assert remote_code_verdict(str(tmp_path / "pre")) == (False, None)

    bad = tmp_path / "tampered"
    shutil.copytree(tmp_path / "hf", bad)
    marker = tmp_path / "ran"
    with open(bad / "modeling_mixln_llama.py", "a") as f:
        f.write(f"\nopen({str(marker)!r}, 'w').write('executed')\n")
    trust, why = remote_code_verdict(str(bad))
    assert not trust and "modeling_mixln_llama.py differs" in why
    tasks = write_mc_task(tmp_path / "tasks", [0, 1, 0, 1, 2])
    code, _, err = run_tool("analyze_layers", "--checkpoint", str(bad), "--lm-eval-tasks", "tiny_mc",
                            "--lm-eval-include", tasks, "--out", str(tmp_path / "out"))
    assert code == 2 and not marker.exists()
    assert "stock transformers classes only" in err and len([ln for ln in err.splitlines() if "differs" in ln]) == 1

    config = json.loads((bad / "config.json").read_text())
    config["auto_map"]["AutoModelForCausalLM"] = "someone/repo--modeling_mixln_llama.MixLNLlamaForCausalLM"
    (bad / "config.json").write_text(json.dumps(config))
    trust, why = remote_code_verdict(str(bad))
    assert not trust and "did not write" in why and "someone/repo--modeling_mixln_llama" in why
