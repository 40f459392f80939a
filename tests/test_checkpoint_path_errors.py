"""A --checkpoint pointed one level too deep (a tag directory) or at a Hugging Face export is refused with
one message that says what the directory is and what to pass instead (before anything is read)."""
import json
import os

import pytest

from megatron_mixln.checkpoint.reader import read_full_state_dict


def test_tag_directory_names_the_save_dir_and_the_tag(tmp_path):
    tag = tmp_path / "run" / "iter_0000040"
    tag.mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"")
    (tag / "mixln_meta.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as err:
        read_full_state_dict(str(tag))
    assert f"pass the directory above it and the tag: {tmp_path / 'run'} --tag iter_0000040" in str(err.value)


def test_empty_directory_keeps_the_generic_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a plain checkpoint"):
        read_full_state_dict(str(tmp_path))


def test_hugging_face_directory_is_named_as_such(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ValueError) as err:
        read_full_state_dict(str(tmp_path))
    msg = str(err.value)
    assert msg.startswith(f"{tmp_path}: a Hugging Face model directory") and "convert_from_hf.py" in msg
    assert os.path.getsize(tmp_path / "model.safetensors") == 0  # nothing read or written
