"""tools/compare_norms.py sweeps the two-stream positions next to Pre-LN and Mix-LN: a sweep
`pre,mix,siamese,residual-dual` trains on sample data and its report shows all four, with the
numbers of each run's metrics file and layer diagnostics of each (the x stream of two-stream layers)."""
import json
import math
import os

from test_compare_norms import _data, tool

POSITIONS = {"pre": "Pre-LN", "mix": "Mix-LN", "siamese": "SiameseNorm", "residual-dual": "ResiDual"}
RUNS = {"pre": "pre-s1", "mix": "mix-k1-s1", "siamese": "siamese-s1", "residual-dual": "residual-dual-s1"}


def test_sweep_of_pre_mix_siamese_residual_dual(tmp_path):
    data = _data(tmp_path)
    flags = dict(vocab_size=256, hidden_size=32, ffn_hidden_size=64, num_layers=4, num_attention_heads=2,
                 seq_length=16, micro_batch_size=4, global_batch_size=8, train_iters=6, lr=1e-2, lr_warmup_iters=2,
                 eval_iters=1, eval_interval=6, log_interval=2, grad_norm_interval=3, save_interval=6,
                 post_ln_layers=1, data_path=data + "_train_text_document", valid_data_path=data + "_valid_text_document")
    args = [a for k, v in flags.items() for a in ("--" + k.replace("_", "-"), str(v))]
    out = str(tmp_path / "out")
    assert tool.main(["--positions", ",".join(POSITIONS), "--seeds", "1", "--out", out, "--parallel", "2",
                      "--analysis-samples", "4", *args]) == 0
    report = open(os.path.join(out, "report.md")).read()
    runs = {r["name"]: r for r in json.load(open(os.path.join(out, "results.json")))["runs"]}
    for position, name in POSITIONS.items():
        run_dir = os.path.join(out, "runs", RUNS[position])
        valid = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl")) if '"valid"' in l]
        ppl = math.exp(valid[-1]["valid_loss"])
        assert runs[RUNS[position]]["valid_ppl"] == ppl
        line = next(l for l in report.splitlines() if l.startswith(f"| {name}"))
        assert f"{ppl:.3f}" in line, line
        layers = json.load(open(os.path.join(run_dir, "layers", "layer_analysis.json")))
        assert len(layers["layer_removal"]) == 4 and all(math.isfinite(r["drop"]) for r in layers["layer_removal"])
    assert json.load(open(os.path.join(out, "runs", "siamese-s1", "layers", "layer_analysis.json")))["positions"] == \
        ["siamese"] * 4
