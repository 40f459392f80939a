"""tools/stability_sweep.py on the shipped sweep files: the 350M design expands to warm-up x clipping
cells of Pre-LN vs Mix-LN k = 1, 2, L/4 LR sweeps with two seeds (dry run: every command validated by
the trainer's parser), the CPU file likewise, and a bad file is refused in one line."""
import importlib.util
import os
import shlex

import numpy as np
import pytest

from megatron_mixln.data import IndexedDatasetWriter

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
spec = importlib.util.spec_from_file_location("stability_sweep", os.path.join(REPO, "tools", "stability_sweep.py"))
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("data") / "tokens")
    with IndexedDatasetWriter(prefix, dtype=np.uint16) as w:
        for doc in np.random.default_rng(0).integers(0, 256, (20, 40)):
            w.add_document(doc)
    return prefix


def _dry_run(capsys, name, data, tmp_path, vocab):
    code = tool.main([os.path.join(REPO, "configs", "paper", name), "--out", str(tmp_path / "out"), "--dry-run",
                      "--tokenizer", f"null:{vocab}", "--data-path", data, "--valid-data-path", data])
    out = capsys.readouterr().out
    assert code == 0, out
    cells = [l.split()[2].rstrip(":") for l in out.splitlines() if l.startswith("[stability_sweep] cell ")]
    runs = [l for l in out.splitlines() if not l.startswith("[")]
    return cells, runs


def test_the_350m_sweep_design(capsys, data, tmp_path):
    from megatron_mixln.training.arguments import parse_configs

    cells, runs = _dry_run(capsys, "mixln_stability.yaml", data, tmp_path, 32000)
    assert cells == [f"lr-warmup-fraction{w}_clip-grad{c}" for w in ("0.01", "0.05", "0.1") for c in ("0", "1")]
    assert len(runs) == 6 * 4 * 5 * 2  # cells x (pre + 3 Mix-LN k) x rates x seeds
    ks = {}
    for line in runs:
        name, cmd = line.split(": ", 1)
        argv = shlex.split(cmd)[3:]  # after "python -m megatron_mixln.pretrain"
        model, train = parse_configs(argv)
        assert model.num_layers == 24 and model.hidden_size == 1024 and train.diagnostics_interval == 100
        assert train.lr_warmup_iters in (100, 500, 1000) and train.clip_grad in (0.0, 1.0)  # 1, 5, 10 % of 10K
        assert train.seed in (1, 2) and train.lr in (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
        ks[name.split("-lr")[0]] = model.positions.count("post")
    assert ks == {"pre": 0, "mix-a0.0417": 1, "mix-a0.0834": 2, "mix-a0.25": 6}
    assert not (tmp_path / "out" / "summary.md").exists()  # a dry run writes nothing


def test_the_cpu_sweep_design(capsys, data, tmp_path):
    cells, runs = _dry_run(capsys, "mixln_stability_cpu.yaml", data, tmp_path, 256)
    assert len(cells) == 2 and len(runs) == 8


def test_a_bad_sweep_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid:\n  clip-grad: 1.0\ncompare_norms:\n  lr-sweep: 1e-3,1e-2\n")
    with pytest.raises(SystemExit, match=r"bad.yaml: grid.clip-grad must be a non-empty list"):
        tool.main([str(bad), "--out", str(tmp_path / "o")])
    bad.write_text("grids: {}\n")
    with pytest.raises(SystemExit, match=r"unknown key\(s\) grids; allowed: grid, compare_norms, pretrain"):
        tool.main([str(bad), "--out", str(tmp_path / "o")])
