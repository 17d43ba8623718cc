"""Every entry point answers `--help` at once: it parses its flags before torch is imported (importing torch,
transformers and peft takes 5-20 s on a 2-core machine, which a user asking for help should not wait for)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Found, not listed: a new entry point is held to the same rule.
ENTRY_POINTS = sorted(str(p.relative_to(ROOT)) for folder in ("", "train", "mmft", "bench")
                      for p in (ROOT / folder).glob("*.py") if 'if __name__ == "__main__"' in p.read_text())

PROBE = """
import runpy, sys
path = sys.argv[1]
sys.argv = [path, "--help"]
try:
    if "/" in path:
        runpy.run_module(path[:-3].replace("/", "."), run_name="__main__", alter_sys=True)
    else:
        runpy.run_path(path, run_name="__main__")
except SystemExit as e:
    print("EXIT", e.code)
print("TORCH", "torch" in sys.modules)
"""


def test_every_entry_point_is_found():
    assert {"app.py", "push_to_hub.py", "train/finetune.py", "train/build_demo.py", "mmft/testing.py",
            "bench/side_by_side.py", "bench/decode.py"} <= set(ENTRY_POINTS)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_help_answers_without_importing_torch(entry):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", PROBE, entry], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout and "EXIT 0" in proc.stdout, proc.stdout[-2000:]
    assert "TORCH False" in proc.stdout, f"{entry} imports torch before answering --help"


def test_tokenizer_conversion_names_a_wrong_folder_in_one_line(tmp_path):
    (tmp_path / "ggml-vocab-phi-3.gguf").write_bytes(b"")  # one of the four files: still not enough
    proc = subprocess.run([sys.executable, "-m", "mmft.testing", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.splitlines()[-1] == (
        f"python -m mmft.testing: error: {tmp_path} must hold ggml-vocab-phi-3.gguf, ggml-vocab-phi-3.gguf.inp, "
        "ggml-vocab-phi-3.gguf.out, microsoft-Phi-3.5-mini-instruct.jinja")
