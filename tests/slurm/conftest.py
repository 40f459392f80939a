import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "training"))

import pytest

from slurm_testlib import start_cluster, stop_cluster, why_no_cluster


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real Slurm 22.05 (slurmctld, 4 slurmd, a munged each) in a private loopback-only network
    namespace, torn down by PID at the end of the session."""
    reason = why_no_cluster()
    if reason:
        pytest.skip(f"no private Slurm cluster: {reason}")
    cluster = start_cluster(str(tmp_path_factory.mktemp("slurm_cluster")))
    yield cluster
    stop_cluster(cluster)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """DATA prefix of a small Megatron train/valid pair (random tokens < 256) for the job scripts."""
    from training_testlib import write_token_dataset

    root = tmp_path_factory.mktemp("slurm_data")
    prefix = str(root / "tiny")
    write_token_dataset(prefix + "_train_text_document", n_docs=200, doc_len=64, seed=0)
    write_token_dataset(prefix + "_valid_text_document", n_docs=20, doc_len=64, seed=1)
    return prefix
