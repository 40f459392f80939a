"""tools/model_summary.py's figures against the model and the planner. The tool runs in this process (its
main(argv), what `python tools/model_summary.py` calls): a fresh interpreter per case would only repeat the
torch import; the tool as a separate process, exit code and one-line errors included, is run by
tests/tools/test_one_line_errors.py and test_no_abbreviations.py."""
import contextlib
import importlib.util
import io
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("model_summary_tool", ROOT / "tools/model_summary.py")
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)


def _run(*args) -> subprocess.CompletedProcess:
    """The tool's exit code, stdout and stderr for the command line `args`."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = tool.main(list(args))
        except SystemExit as exc:  # argparse's errors
            code = exc.code
    return subprocess.CompletedProcess(["model_summary.py", *args], code, out.getvalue(), err.getvalue())


def test_7b_mix_summary_on_meta():
    r = _run("--preset", "7b", "--norm-position", "mix", "--post-ln-layers", "2")
    assert r.returncode == 0, r.stderr
    assert "6,738,415,616 total" in r.stdout
    assert f"{6_738_415_616 - 2 * 32000 * 4096:,} without embeddings" in r.stdout
    assert "norm positions: post*2,pre*30" in r.stdout
    rows = [l.split() for l in r.stdout.splitlines() if l.strip()[:2].strip().isdigit() and len(l.split()) == 6]
    assert [row[1] for row in rows] == ["post"] * 2 + ["pre"] * 30
    total_gib = 16 * 6_738_415_616 / 1024**3
    assert f"{total_gib:.2f}" in r.stdout


def test_bad_flag_is_a_clear_error():
    r = _run("--preset", "71m", "--norm-position", "mix", "--post-ln-layers", "13")
    assert r.returncode == 2 and "--post-ln-layers" in r.stderr


def test_zoo_summary_counts_norm_parameters():
    """Per-layer norm parameters (residual and q/k/v norms, DyT's alpha) against the planner's formula."""
    from megatron_mixln.model import ModelConfig
    from megatron_mixln.planning.model_states import layer_norm_param_count

    flags = ["--preset", "9m", "--norm-position", "hybridnorm-star", "--normalization", "DyT", "--qk-norm-per-head-gain"]
    r = _run(*flags)
    assert r.returncode == 0, r.stderr
    # DyT turns on the learnable embedding scale by default (its LLaMA code's shared_scale, init sqrt(hidden))
    assert ("norm zoo: qk-norm none (per-head gain), alpha init attn/ffn/final 0.8,0.2,0.2, embedding x learnable "
            "scalar (init sqrt(128)=11.31)") in r.stdout
    rows = [l.split() for l in r.stdout.splitlines() if l.strip()[:2].strip().isdigit() and len(l.split()) == 6]
    cfg = ModelConfig.from_preset("9m", norm_position="hybridnorm-star", normalization="DyT", qk_norm_per_head_gain=True,
                                  learnable_embedding_scale=True)
    assert [row[1] for row in rows] == list(cfg.positions)
    assert [int(row[4].replace(",", "")) for row in rows] == [layer_norm_param_count(cfg, p) for p in cfg.positions]
    from megatron_mixln.planning import param_counts

    assert f"parameters: {param_counts(cfg)['total']:,} total" in r.stdout
    r = _run(*flags, "--no-learnable-embedding-scale")
    assert f"parameters: {param_counts(cfg)['total'] - 1:,} total" in r.stdout and "embedding x" not in r.stdout


def test_two_stream_positions_count_both_residual_streams():
    """siamese keeps two residual streams: the summary says so, and its planner figures (activations
    with recompute: one block input per layer, two after the first) exceed a one-stream model's."""
    from megatron_mixln.model import ModelConfig
    from megatron_mixln.planning import activation_bytes

    outs = {p: _run("--preset", "71m", "--norm-position", p) for p in ("pre", "siamese", "residual-dual")}
    for p, r in outs.items():
        assert r.returncode == 0, r.stderr
        streams = 1 if p == "pre" else 2
        assert f"residual streams between layers: {streams} " in r.stdout
        cfg = ModelConfig.from_preset("71m", norm_position=p)
        kept = activation_bytes(cfg, 1, cfg.seq_length, recompute=True)["total"]
        assert f"{kept / 1024**3:.3f} GiB with --recompute-activations" in r.stdout
    pre, dual = (activation_bytes(ModelConfig.from_preset("71m", norm_position=p), 1, 256, recompute=True)["blocks"]
                 for p in ("pre", "residual-dual"))
    L = ModelConfig.from_preset("71m").num_layers
    assert dual == pre * (2 * L - 1) // L


def test_linear_biases_are_counted_like_the_planner():
    """--add-bias-linear --add-output-layer-bias: the summary names the biases and its total is the planner's."""
    from megatron_mixln.model import ModelConfig
    from megatron_mixln.planning import param_counts

    r = _run("--preset", "9m", "--add-bias-linear", "--add-output-layer-bias")
    assert r.returncode == 0, r.stderr
    assert "linear biases: q/k/v, o, gate/up/down, LM head" in r.stdout
    cfg = ModelConfig.from_preset("9m", add_bias_linear=True, add_output_layer_bias=True)
    plain = param_counts(ModelConfig.from_preset("9m"))["total"]
    total = param_counts(cfg)["total"]
    extra = cfg.num_layers * (2 * cfg.hidden_size + 2 * cfg.num_query_groups * cfg.head_dim + 2 * cfg.ffn_hidden_size
                              + cfg.hidden_size) + cfg.vocab_size  # q,o | k,v | gate,up | down | head
    assert total - plain == extra and f"{total:,} total" in r.stdout
