"""llama.cpp's half of `bench.side_by_side`: find a built tree, convert a transformers folder to GGUF
with llama.cpp's own converter, quantize it, and time it with `llama-bench`. Plus the subprocess
runner both halves use (peak RSS sampled per child)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench import common


def llama_cpp_dir(arg: str | None) -> tuple[Path | None, str]:
    """The llama.cpp tree, or None and why."""
    where = arg or os.environ.get("MMFT_LLAMA_CPP")
    if not where:
        return None, "no --llama-cpp DIR and no MMFT_LLAMA_CPP: llama.cpp half skipped"
    root = Path(where)
    missing = [p for p in ("build/bin/llama-bench", "build/bin/llama-quantize", "convert_hf_to_gguf.py")
               if not (root / p).exists()]
    if missing:
        return None, f"llama.cpp at {root} is not built ({', '.join(missing)} missing): llama.cpp half skipped"
    return root, f"llama.cpp at {root}"


CONVERT = """
import sys
root, vocab, model_dir, out = sys.argv[1:5]
sys.path[:0] = [root, root + "/gguf-py"]
import gguf
from conversion import phi

def set_vocab(self):
    # The saved folder has no tokenizer.model: copy Phi-3's vocabulary from the vocab-only GGUF.
    fields = gguf.GGUFReader(vocab).fields
    get = lambda k: fields[k].contents()
    self.gguf_writer.add_tokenizer_model(get("tokenizer.ggml.model"))
    self.gguf_writer.add_tokenizer_pre(get("tokenizer.ggml.pre"))
    self.gguf_writer.add_token_list(get("tokenizer.ggml.tokens"))
    self.gguf_writer.add_token_scores(get("tokenizer.ggml.scores"))
    self.gguf_writer.add_token_types(get("tokenizer.ggml.token_type"))
    self.gguf_writer.add_bos_token_id(get("tokenizer.ggml.bos_token_id"))
    self.gguf_writer.add_eos_token_id(get("tokenizer.ggml.eos_token_id"))
    self.gguf_writer.add_unk_token_id(get("tokenizer.ggml.unknown_token_id"))
    self.gguf_writer.add_pad_token_id(get("tokenizer.ggml.padding_token_id"))
    self.gguf_writer.add_add_bos_token(get("tokenizer.ggml.add_bos_token"))

phi.Phi3MiniModel.set_vocab = set_vocab
import convert_hf_to_gguf
sys.argv = ["convert_hf_to_gguf.py", model_dir, "--outfile", out, "--outtype", "bf16"]
convert_hf_to_gguf.main()
"""


def run_logged(cmd: list[str], log: Path) -> tuple[int, float, float]:
    """Run, output to `log`; (return code, seconds, the child's peak RSS in GB, sampled every 50 ms).

    Sampled, not getrusage: a child's ru_maxrss starts at this (forked) process's RSS."""
    import psutil

    t, peak = time.perf_counter(), 0
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        watched = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                peak = max(peak, watched.memory_info().rss)
            except psutil.Error:
                pass
            time.sleep(0.05)
    return proc.returncode, time.perf_counter() - t, peak / common.GB


def tail(log: Path, n: int = 3) -> str:
    lines = log.read_text(errors="replace").strip().splitlines()
    return " | ".join(lines[-n:])


def make_ggufs(root: Path, tmp: Path, vocab: str, threads: int, kinds: list[str]) -> tuple[dict, list[str]]:
    """HF folder -> bf16 GGUF (llama.cpp's converter) -> Q4_K_M, Q8_0 (llama-quantize). Files a
    kept folder already holds (--keep, a re-run) are reused."""
    notes, ggufs = [], {}
    bf16 = tmp / "lm-bf16.gguf"
    todo = [k for k in kinds if not (tmp / f"lm-{k}.gguf").exists()]  # written as .part, then renamed
    if todo and not bf16.exists():
        rc, secs, _ = run_logged([sys.executable, "-c", CONVERT, str(root), vocab, str(tmp / "lm"),
                                  str(bf16) + ".part"], tmp / "convert.log")
        if rc != 0:
            return {}, [f"convert_hf_to_gguf failed ({rc}): {tail(tmp / 'convert.log')}"]
        Path(str(bf16) + ".part").rename(bf16)
        notes.append(f"converted in {secs:.0f} s")
    for kind in kinds:
        out = tmp / f"lm-{kind}.gguf"
        if kind not in todo:
            ggufs[kind] = out
            notes.append(f"{kind}: reused {out}")
            continue
        part = Path(str(out) + ".part")
        # every core: quantizing is preparation, not what is timed
        rc, secs, _ = run_logged([str(root / "build/bin/llama-quantize"), str(bf16), str(part), kind,
                                  str(len(os.sched_getaffinity(0)) or threads)],
                                 tmp / f"quantize-{kind}.log")
        if rc != 0:
            notes.append(f"llama-quantize {kind} failed ({rc}): {tail(tmp / f'quantize-{kind}.log')}")
            continue
        part.rename(out)
        ggufs[kind] = out
        notes.append(f"{kind} in {secs:.0f} s, {out.stat().st_size / common.GB:.2f} GB")
    bf16.unlink(missing_ok=True)
    return ggufs, notes


def llama_bench(root: Path, gguf: Path, kind: str, threads: int, prompt: int, gen: int, reps: int,
                log: Path) -> dict:
    load_before = common.load_avg()
    cmd = [str(root / "build/bin/llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", str(prompt),
           "-n", str(gen), "-r", str(reps), "-o", "json"]
    rc, secs, peak = run_logged(cmd, log)
    row = dict(engine="llama.cpp", precision=kind, threads=threads, load_before=load_before,
               load_after=common.load_avg(), peak_rss_gb=round(peak, 2), wall_s=round(secs, 1))
    if rc != 0:
        # Some CPUs die in llama.cpp's AMX kernels during prompt processing: build it with AMX off.
        why = "SIGILL: rebuild llama.cpp without AMX (cmake -DGGML_NATIVE=ON -DGGML_AMX_TILE=OFF " \
              "-DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)" if rc == -4 else tail(log)
        return dict(row, error=f"llama-bench exited {rc}: {why}")
    text = log.read_text()
    results = json.loads(text[text.index("["):text.rindex("]") + 1])
    for r in results:
        if r.get("n_prompt") and not r.get("n_gen"):
            row["prefill_s"] = round(r["n_prompt"] / r["avg_ts"], 3)
        if r.get("n_gen") and not r.get("n_prompt"):
            row["decode_tokens_per_s"] = round(r["avg_ts"], 3)
    return row
