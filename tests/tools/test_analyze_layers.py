"""tools/analyze_layers.py on a plain checkpoint and real indexed data, against the library computed directly."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]


def _setup(tmp_path):
    from megatron_mixln.data import IndexedDatasetWriter
    from megatron_mixln.model import ModelConfig, build_model
    from megatron_mixln.checkpoint.convert import save_plain

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, ffn_hidden_size=48, num_layers=3, num_attention_heads=4,
                      norm_position="mix", post_ln_layers=1)
    model = build_model(cfg)
    save_plain(model.state_dict(), str(tmp_path / "plain"), cfg)
    rng = np.random.default_rng(0)
    with IndexedDatasetWriter(str(tmp_path / "tokens"), dtype=np.uint16) as w:
        for _ in range(20):
            w.add_document(rng.integers(0, 64, 30))
    return model.eval()


def test_layer_analysis_of_a_plain_checkpoint(tmp_path):
    from megatron_mixln.data import build_train_valid_test_datasets
    from megatron_mixln.diagnostics import angular_distances, layer_removal_drop

    model = _setup(tmp_path)
    r = subprocess.run([sys.executable, str(ROOT / "tools/analyze_layers.py"), "--checkpoint", str(tmp_path / "plain"),
                        "--data-path", str(tmp_path / "tokens"), "--seq-length", "8", "--num-samples", "6",
                        "--micro-batch-size", "4", "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "out/layer_analysis.json").read_text())
    assert result["positions"] == ["post", "pre", "pre"]
    assert (tmp_path / "out/angular_distance.png").stat().st_size > 0
    assert (tmp_path / "out/layer_removal.png").stat().st_size > 0
    data, _, _ = build_train_valid_test_datasets([str(tmp_path / "tokens")], "1,0,0", 8, 1234, (6, 0, 0), None)
    tokens = torch.from_numpy(np.stack([data[i]["tokens"] for i in range(6)]))
    batches = [tokens[:4], tokens[4:]]
    d = angular_distances(model, batches)
    assert math.isclose(result["angular_distance"][0][1], d[0, 1].item(), rel_tol=1e-6)
    assert result["angular_distance"][0][0] is None
    removal = layer_removal_drop(model, batches)
    assert [round(r["drop"], 6) for r in result["layer_removal"]] == [round(r["drop"], 6) for r in removal]


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    _setup(tmp_path)
    (tmp_path / "empty").mkdir()
    r = subprocess.run([sys.executable, str(ROOT / "tools/analyze_layers.py"), "--checkpoint", str(tmp_path / "empty"),
                        "--data-path", str(tmp_path / "tokens"), "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "empty" in r.stderr and "latest" in r.stderr
