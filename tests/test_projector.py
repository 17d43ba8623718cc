"""Projector layout and strict safetensors loading."""

import subprocess
from pathlib import Path

import pytest
import torch

from mmft.projector import Projector, load_projector, save_projector


def test_layout_matches_llava_projector_names():
    p = Projector(16, 64)
    assert list(dict(p.named_children())) == ["linear_1", "act", "linear_2"]
    assert p(torch.zeros(2, 5, 16)).shape == (2, 5, 64)
    deep = Projector(16, 64, hidden_dim=32, depth=3)
    assert [k for k in deep.state_dict() if k.endswith("weight")] == ["linear_1.weight", "linear_2.weight", "linear_3.weight"]
    assert deep(torch.zeros(1, 1, 16)).shape == (1, 1, 64)


def test_a_one_linear_projector_is_refused():
    with pytest.raises(ValueError, match="depth >= 2"):
        Projector(16, 64, 32, depth=1)  # it would return 32 features, not the 64 asked for


def test_round_trip_is_exact(tmp_path):
    a, b = Projector(16, 64), Projector(16, 64)
    load_projector(b, save_projector(a, tmp_path / "projector.safetensors"))
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key])


def test_shape_mismatch_names_file_and_both_shapes(tmp_path):
    path = save_projector(Projector(512, 64), tmp_path / "projector.safetensors")
    with pytest.raises(ValueError) as err:
        load_projector(Projector(768, 64), path)
    message = str(err.value)
    assert str(path) in message
    assert "linear_1.weight: file has shape (64, 512), model expects (64, 768)" in message


def test_missing_and_extra_keys_are_errors(tmp_path):
    path = save_projector(Projector(16, 64, depth=3), tmp_path / "p.safetensors")
    with pytest.raises(ValueError, match=r"unexpected keys \['linear_3.bias', 'linear_3.weight'\]"):
        load_projector(Projector(16, 64, depth=2), path)
    path2 = save_projector(Projector(16, 64, depth=2), tmp_path / "p2.safetensors")
    with pytest.raises(ValueError, match=r"missing keys \['linear_3.bias', 'linear_3.weight'\]"):
        load_projector(Projector(16, 64, depth=3), path2)


def test_pickles_and_missing_files_are_refused(tmp_path):
    bad = tmp_path / "projector.safetensors"
    bad.write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_projector(Projector(16, 64), bad)
    with pytest.raises(FileNotFoundError, match="projector weights not found"):
        load_projector(Projector(16, 64), tmp_path / "nope.safetensors")


def test_no_torch_load_in_the_code():
    root = Path(__file__).resolve().parents[1]
    found = subprocess.run(["grep", "-rn", "--include=*.py", "torch.load(", "mmft", "train", "app.py",
                            "push_to_hub.py", "bench"], cwd=root, capture_output=True, text=True).stdout
    assert found == ""
