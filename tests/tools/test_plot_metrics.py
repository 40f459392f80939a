"""tools/plot_metrics.py: run directories -> loss/perplexity curves and per-layer grad-norm plots."""
import json
import os
import sys

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(REPO, "tools"))
import plot_metrics  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def _run_dir(path, position, positions, layers=3, steps=(10, 20, 30), extra_lines=(), scale=1.0):
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump({"model": {"norm_position": position, "num_layers": layers}, "positions": positions}, fh)
    with open(os.path.join(path, "metrics.jsonl"), "w") as fh:
        for s in steps:
            fh.write(json.dumps({"kind": "train", "step": s, "loss": 10.0 / s, "lr": 1e-3}) + "\n")
            fh.write(json.dumps({"kind": "grad_norms", "step": s, **{
                f"grad_norm/layer_{l:02d}/{sub}": (l + 1) * s * 1e-3 for l in range(1, layers + 1)
                for sub in ("attn", "mlp", "attn_norm", "mlp_norm")}}) + "\n")
            fh.write(json.dumps({"kind": "diagnostics", "step": s, **{
                f"{m}/layer_{l:02d}": scale * l * s for l in range(1, layers + 1)
                for m in ("act_rms_out", "act_max_over_median", "act_kurtosis", "attn_logit_max", "attn_entropy",
                          "update_ratio")}, "attn_logit_max/layer_01/head_00": 1.0, "z_max": 3.0}) + "\n")
        fh.write(json.dumps({"kind": "valid", "step": steps[-1], "valid_loss": 3.0, "valid_ppl": 20.09}) + "\n")
        for line in extra_lines:
            fh.write(line + "\n")
    return str(path)


def test_plots_of_two_runs(tmp_path, capsys):
    """The command line, through main(argv) in this process (the process's exit codes: tests/tools/test_one_line_errors.py)."""
    mix = _run_dir(tmp_path / "mix", "mix", "post,pre*2")
    pre = _run_dir(tmp_path / "pre", "pre", "pre*3",
                   extra_lines=[json.dumps({"kind": "train", "step": 20, "loss": 99.0}), '{"kind": "tr'])
    out = tmp_path / "plots"
    code = plot_metrics.main([mix, pre, "--out", str(out)])
    proc = capsys.readouterr()
    assert code == 0, proc.err
    expected = {"loss.png", "perplexity.png", "grad_norms_Mix-LN_k_1.png", "grad_norm_heatmap_Mix-LN_k_1.png",
                "grad_norms_Pre-LN.png", "grad_norm_heatmap_Pre-LN.png", "diagnostics_heatmap_Mix-LN_k_1.png",
                "diagnostics_heatmap_Pre-LN.png", "layer_profiles.png"}
    assert set(os.listdir(out)) == expected
    for name in expected:
        data = (out / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000
    assert "Mix-LN (k=1)" in proc.out and "validation perplexity 20.090 at step 30" in proc.out


def test_tables_and_labels(tmp_path):
    run = plot_metrics.load_run(_run_dir(tmp_path / "r", "mix", "post*3,pre*9", layers=12,
                                         extra_lines=[json.dumps({"kind": "train", "step": 20, "loss": 99.0})]))
    assert run["label"] == "Mix-LN (k=3)"
    assert plot_metrics.run_label({"model": {"norm_position": "mix"}, "positions": "pre*12"}, "r") == "Mix-LN (k=0)"
    assert plot_metrics.run_label({"model": {"norm_position": "mix"}, "positions": "post,pre*11"}, "r") == "Mix-LN (k=1)"
    assert [r["loss"] for r in run["train"]] == [1.0, 99.0, 10.0 / 30]  # a re-logged step: the last wins
    steps, table = plot_metrics.grad_norm_table(run)
    assert steps == [10, 20, 30] and list(table) == ["attn", "mlp", "attn_norm", "mlp_norm"]
    assert sorted(table["attn"]) == list(range(1, 13))
    assert table["mlp"][12] == pytest.approx([0.13, 0.26, 0.39])


def test_missing_metrics_is_an_error(tmp_path):
    from megatron_mixln.errors import UsageError

    with pytest.raises(UsageError, match="no metrics.jsonl"):
        plot_metrics.load_run(str(tmp_path))


def test_one_colour_scale_per_metric_across_runs(tmp_path, monkeypatch):
    """Two runs whose diagnostics differ by 10x: every heatmap of a metric gets the same colour range,
    spanning both runs' values."""
    runs = [plot_metrics.load_run(_run_dir(tmp_path / name, pos, positions, scale=scale))
            for name, pos, positions, scale in (("mix", "mix", "post,pre*2", 1.0), ("pre", "pre", "pre*3", 10.0))]
    seen = {}
    real = plot_metrics._heatmap

    def spy(fig, ax, grid, steps, norm, title, label):
        seen.setdefault(title, []).append((norm.vmin, norm.vmax))
        return real(fig, ax, grid, steps, norm, title, label)

    monkeypatch.setattr(plot_metrics, "_heatmap", spy)
    from matplotlib.figure import Figure

    monkeypatch.setattr(Figure, "savefig", lambda *a, **k: None)  # the ranges are decided before drawing
    plot_metrics.plot(runs, str(tmp_path / "plots"), profile_steps=[10, 30])
    assert seen["act_rms_out"] == [(10.0, 900.0)] * 2  # l * s: layer 1 step 10 .. 10 x (layer 3 step 30)
    assert seen["attn"] == [(pytest.approx(0.02), pytest.approx(0.12))] * 2
    assert len(seen) == 4 + 6


def test_readable_log_ticks_and_integer_layer_ticks():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megatron_mixln.research.plot_style import integer_axis, readable_log_axis

    fig, ax = plt.subplots()
    ax.plot([1, 2, 3, 4, 5], [150, 160, 175, 185, 190])
    ax.set_yscale("log")
    readable_log_axis(ax, "y")
    integer_axis(ax, "x")
    fig.canvas.draw()
    lo, hi = ax.get_ylim()
    yticks = [t for t in ax.get_yticks() if lo <= t <= hi]
    assert len(yticks) >= 3 and all(t < 200 for t in yticks)  # a perplexity axis under 200 has ticks
    assert [t.get_text() for t in ax.get_yticklabels() if t.get_text()][:1] == [f"{yticks[0]:g}"]
    assert all(float(t).is_integer() for t in ax.get_xticks())
    ax.set_ylim(1, 5000)
    readable_log_axis(ax, "y")
    assert {1, 2, 5, 10, 20, 50, 100, 200, 500, 1000}.issubset(set(ax.get_yticks()))
    plt.close(fig)


def test_heatmap_cells_sit_on_their_logged_steps():
    """Steps 10, 20, 30, 40: each cell is centred on its step and the ticks are the steps themselves
    (the cells once spread over [9.5, 40.5] in equal widths, so step 10's cell sat at ~13.9)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots()
    plot_metrics._heatmap(fig, ax, [[1.0, 2.0, 3.0, 4.0], [2.0, 3.0, 4.0, 5.0]], [10, 20, 30, 40], None, "t", "v")
    mesh = ax.collections[0]
    edges = np.unique(mesh.get_coordinates()[..., 0])
    np.testing.assert_allclose((edges[1:] + edges[:-1]) / 2, [10, 20, 30, 40])
    assert list(ax.get_xticks()) == [10, 20, 30, 40]
    plt.close(fig)
