import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ["HF_HUB_OFFLINE"] = "1"  # everything here is offline: no hub look-ups
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def spm_model(tmp_path_factory):
    """A 300-piece sentencepiece BPE model (pad 0, eos 1, unk 2, bos 3) trained on this repository's README and docs/."""
    from hf_testlib import train_spm

    return train_spm(str(tmp_path_factory.mktemp("spm") / "spm"))
