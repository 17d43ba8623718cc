"""GPU check: QLoRA training steps and 4-bit generation at real size, in under 5 minutes.

    python -m bench.gpu_check            # on a CUDA machine: Phi-3.5-mini shapes + ViT-B/32-sized CLIP
    python -m bench.gpu_check --tiny     # anywhere (CPU here): the tiny kit, same code path
    python -m bench.gpu_check --checks finetune,vllm   # QLoRA through train.finetune; serve its Llava export

`--checks` picks what runs (default `bench`): `bench` = the timed steps below; `finetune` = a few QLoRA
steps through the real entry point `train.finetune` (4-bit, activation checkpointing, shapes data,
patch mode) on the same random real-size checkpoint, writing a round; `vllm` = that round exported
with `mmft.export` (bf16) and served by vLLM if it imports, its greedy answer next to transformers'.

Self-contained: random weights are written as a real checkpoint (bf16 safetensors) and loaded back
through the project's own `mmft.loading.build_model(cfg, quantize="nf4", trainable=True)`: 4-bit NF4
base (bf16 compute), LoRA, a trainable projector. Training runs batches of image + question + answer
through `MultimodalModel.forward` with activation checkpointing; generation is the app's KV-cached
`MultimodalModel.generate`. Prints samples/s, tokens/s, peak GPU memory and model FLOPs utilisation
(MFU) against the card's dense bf16 peak.

MFU counts *model* FLOPs: per trained token 2 N (forward) + 2 N (backward, activation gradients; the
frozen 4-bit weights need no weight gradients) over the LM's linear weights N, plus attention
(4 L d T per token forward, twice that with its backward) and CLIP's forward. Activation
checkpointing's recomputed forward is not counted (that would be hardware FLOPs).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from bench import POSITIVE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny kit models (runs on CPU; what the tests run)")
    parser.add_argument("--layers", type=POSITIVE, default=32)
    parser.add_argument("--batch", type=POSITIVE, default=8, help="samples per training step")
    parser.add_argument("--steps", type=POSITIVE, default=10, help="timed training steps (after 2 warm-up steps)")
    parser.add_argument("--gen-tokens", type=POSITIVE, default=64)
    parser.add_argument("--budget-s", type=float, default=270, help="stop timed steps early past this wall time")
    parser.add_argument("--checks", default="bench", help="comma list of bench, finetune, vllm (vllm needs finetune)")
    parser.add_argument("--finetune-steps", type=POSITIVE, default=4)
    return parser


if __name__ == "__main__":  # flags before torch: --help and a mistyped flag answer at once
    build_parser().parse_args()

import torch  # noqa: E402

from bench import common  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOPS, no sparsity), from NVIDIA's data sheets. Checked in order.
BF16_PEAK_TFLOPS = [
    ("H200", 989.4), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.4),  # H100 = SXM
    ("GH200", 989.4), ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0),
    ("A10G", 70.0), ("A10", 125.0),
]


def card_peak_tflops(name: str) -> float | None:
    for key, peak in BF16_PEAK_TFLOPS:
        if key.lower() in name.lower():
            return peak
    return None


def write_real_size_checkpoint(folder: Path, device: torch.device, layers: int) -> None:
    """Random Phi-3.5-mini-shaped LM (bf16) + ViT-B/32-sized CLIP, saved like downloaded models."""
    from transformers import CLIPConfig, CLIPModel, Phi3ForCausalLM
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    from mmft.testing import make_tokenizer

    tokenizer = make_tokenizer()
    config = common.phi35_config(layers)
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = tokenizer.bos_token_id
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.device("meta"):
        lm = Phi3ForCausalLM(config).to(torch.bfloat16)  # no memory yet: bf16 from the start
    lm.to_empty(device=device)
    for sub in lm.modules():
        common._fill_(sub, generator)
    lm.model.rotary_emb = Phi3RotaryEmbedding(config=config).to(device)
    lm.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids("<|end|>"), tokenizer.eos_token_id]
    lm.generation_config.pad_token_id = tokenizer.pad_token_id
    lm.save_pretrained(folder / "lm")
    tokenizer.save_pretrained(folder / "lm")
    del lm
    clip = CLIPModel(CLIPConfig())  # ViT-B/32 shapes; 150 M parameters, initialised normally
    clip.save_pretrained(folder / "clip")
    CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(
        folder / "clip")
    if device.type == "cuda":
        torch.cuda.empty_cache()


def make_batch(model, batch_size: int, seed: int = 0) -> dict:
    """`batch_size` image + question + answer samples, padded as the training collator pads them."""
    import numpy as np
    from PIL import Image

    from mmft.data import pad_batch
    from mmft.prompt import encode_chat

    rng = np.random.default_rng(seed)
    examples = []
    for i in range(batch_size):
        turns = [("user", f"{common.QUESTION} (sample {i})"),
                 ("assistant", "A man rides a red bike down the street next to a bus, a car and a tree " * (1 + i % 2))]
        examples.append(vars(encode_chat(model.tokenizer, model.cfg, turns, num_image_tokens=model.vision.num_tokens)))
    batch = pad_batch(examples, model.tokenizer.pad_token_id)
    images = [Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)) for _ in range(batch_size)]
    batch["pixel_values"] = model.vision.preprocess(images)
    return batch


def model_flops_per_step(model, batch: dict) -> float:
    lm_cfg = model.lm.config
    n_linear = sum(p.numel() for n, p in _lm_linear_weights(model))
    tokens = int(batch["attention_mask"].sum())
    lengths = batch["attention_mask"].sum(1).float()
    attention_fwd = 4 * lm_cfg.num_hidden_layers * lm_cfg.hidden_size * float((lengths ** 2).sum())
    vision = 2 * sum(p.numel() for p in model.vision.vision_model.parameters()) * model.vision.num_tokens
    vision *= batch["pixel_values"].shape[0]
    return 4 * n_linear * tokens + 2 * attention_fwd + vision


def _lm_linear_weights(model):
    """The LM's linear weights at their unquantized size (Params4bit counts packed bytes, so use shapes)."""
    for name, module in model.lm.named_modules():
        if isinstance(module, torch.nn.Linear) and "lora_" not in name:
            yield name, torch.empty(module.out_features, module.in_features, device="meta")


def finetune_check(cfg, work: Path, steps: int, tiny: bool) -> dict:
    """A few QLoRA steps through `train.finetune` itself: 4-bit NF4, activation checkpointing, patch mode."""
    from mmft.shapes import write_dataset
    from train import finetune as entry

    data = write_dataset(work / "shapes", n=32, seed=0)
    out = work / "runs"
    argv = ["--lm_model_id", cfg.lm_model_id, "--vit_model_id", cfg.vit_model_id, "--vit_feature_mode", "patch",
            "--train_json", str(data), "--image_dir", str(work / "shapes" / "images"), "--output_dir", str(out),
            "--max_steps", str(steps), "--per_device_train_batch_size", "4", "--quantize", "nf4",
            "--eval_strategy", "no", "--save_strategy", "no", "--logging_steps", "1", "--eval_fraction", "0"]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    try:
        entry.main(argv)
    except Exception as err:  # recorded, not raised: the other checks still run
        return dict(ok=False, error=f"{type(err).__name__}: {err}", argv=argv)
    folder = out / "round-1"
    info = json.loads((folder / "config.json").read_text())["round"]
    row = dict(ok=True, round=str(folder), steps=info.get("steps"), train_loss=info.get("train_loss"),
               seconds=round(time.perf_counter() - t, 1), activation_checkpointing=True, quantize="nf4")
    if torch.cuda.is_available():
        row["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / common.GB, 2)
    return row


def vllm_check(round_dir: Path, work: Path, device) -> dict:
    """Export the round (bf16) and, if vLLM imports, serve it; its greedy answer beside transformers'."""
    from PIL import Image

    from mmft.export import export_llava

    t = time.perf_counter()
    folder = export_llava(round_dir, work / "llava", dtype="bfloat16", force=True)
    row = dict(export=str(folder), export_s=round(time.perf_counter() - t, 1))
    image = Image.new("RGB", (224, 224), "red")
    question = "What colour is the shape?"
    try:
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        processor = AutoProcessor.from_pretrained(folder)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        llava = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16).to(device)
        inputs = processor(images=image, text=prompt, return_tensors="pt").to(device)
        out = llava.generate(**inputs, max_new_tokens=16, do_sample=False)
        row["transformers"] = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        del llava
        if device.type == "cuda":
            torch.cuda.empty_cache()
    except Exception as err:
        row["transformers_error"] = f"{type(err).__name__}: {err}"
    try:
        from vllm import LLM, SamplingParams
    except Exception as err:  # not installed (pip install vllm) or no CUDA build
        row["vllm"] = f"not available: {type(err).__name__}: {err}"
        return row
    try:
        t = time.perf_counter()
        llm = LLM(model=str(folder), dtype="bfloat16", max_model_len=2048, gpu_memory_utilization=0.5,
                  limit_mm_per_prompt={"image": 1})
        outs = llm.generate({"prompt": prompt, "multi_modal_data": {"image": image}},
                            SamplingParams(temperature=0.0, max_tokens=16))
        row.update(vllm=outs[0].outputs[0].text, vllm_s=round(time.perf_counter() - t, 1))
        row["same_as_transformers"] = row["vllm"].strip() == row.get("transformers", "").strip()
    except Exception as err:
        row["vllm_error"] = f"{type(err).__name__}: {err}"
    return row


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    checks = {c.strip() for c in args.checks.split(",") if c.strip()}
    if not checks <= {"bench", "finetune", "vllm"} or ("vllm" in checks and "finetune" not in checks):
        raise SystemExit(f"--checks takes bench, finetune, vllm (vllm needs finetune), got {args.checks!r}")
    wall = time.perf_counter()

    from mmft.loading import build_model

    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("bench.gpu_check needs a CUDA GPU at real size; run it with --tiny to check it on CPU")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else common.cpu_model()
    peak = card_peak_tflops(card) if device.type == "cuda" else None
    result = dict(bench="gpu_check", machine=common.machine(), device=str(device), card=card,
                  bf16_peak_tflops=peak, tiny=args.tiny, layers=None if args.tiny else args.layers,
                  batch=args.batch)
    phases = {}

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        if args.tiny:
            from mmft.testing import build_tiny_models

            cfg = build_tiny_models(tmp, mode="patch")
        else:
            write_real_size_checkpoint(Path(tmp), device, args.layers)
            from mmft.config import MMFTConfig

            cfg = MMFTConfig(lm_model_id=str(Path(tmp) / "lm"), vit_model_id=str(Path(tmp) / "clip"),
                             vit_feature_mode="patch")
        phases["write_checkpoint_s"] = round(time.perf_counter() - t, 1)
        if "finetune" in checks:
            result["finetune"] = finetune_check(cfg, Path(tmp), args.finetune_steps, args.tiny)
            print(f"finetune: {json.dumps(result['finetune'])}", file=sys.stderr)
            if "vllm" in checks:
                result["vllm"] = (vllm_check(Path(result["finetune"]["round"]), Path(tmp), device)
                                  if result["finetune"]["ok"] else dict(ok=False, error="no round: finetune failed"))
        if "bench" not in checks:
            print(json.dumps({k: result.get(k) for k in ("finetune", "vllm")}, indent=1), file=sys.stderr)
            common.emit(result)
            return result
        t = time.perf_counter()
        torch.manual_seed(0)
        model = build_model(cfg, device=device, quantize="nf4", trainable=True)
        phases["load_4bit_s"] = round(time.perf_counter() - t, 1)

    base = model.lm.get_base_model()
    result["quantized_linears"] = sum(type(m).__name__ == "Linear4bit" for m in base.modules())
    result["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    batch = {k: v.to(device) for k, v in make_batch(model, args.batch).items()}
    result["tokens_per_sample"] = round(float(batch["attention_mask"].sum(1).float().mean()), 1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> float:
        out = model(**batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out.loss.detach().item()

    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses = [step() for _ in range(2)]  # warm-up
    sync(device)
    t, done = time.perf_counter(), 0
    while done < args.steps and time.perf_counter() - wall < args.budget_s:
        losses.append(step())
        done += 1
    sync(device)
    train_s = time.perf_counter() - t
    flops = model_flops_per_step(model, batch) * done
    train = dict(steps=done, seconds=round(train_s, 2), samples_per_s=round(done * args.batch / train_s, 3),
                 tokens_per_s=round(done * int(batch["attention_mask"].sum()) / train_s, 1),
                 model_flops_per_step=int(flops / max(done, 1)),
                 model_tflops_per_s=round(flops / train_s / 1e12, 6), losses=[round(x, 3) for x in losses],
                 finite_loss=all(x == x and abs(x) != float("inf") for x in losses))
    train["mfu"] = round(train["model_tflops_per_s"] / peak, 4) if peak else None
    if device.type == "cuda":
        train["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated(device) / common.GB, 2)
        train["peak_gpu_reserved_gb"] = round(torch.cuda.max_memory_reserved(device) / common.GB, 2)
    result["train"] = train

    model.eval()
    optimizer.zero_grad(set_to_none=True)
    del optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    prompt = {k: v[:1] for k, v in common.image_batch(model).items()}
    n = args.gen_tokens
    with torch.no_grad():
        model.generate(**prompt, max_new_tokens=2, min_new_tokens=2, do_sample=False)  # warm-up
        sync(device)
        timer = common.TokenTimer()
        out = model.generate(**prompt, streamer=timer, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        sync(device)
        total = time.perf_counter() - timer.start
    gen = common.rates(timer.times, out.shape[1], total)
    if device.type == "cuda":
        gen["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated(device) / common.GB, 2)
    result["generate"] = gen
    result["phases"] = phases
    result["wall_s"] = round(time.perf_counter() - wall, 1)
    result["load_avg_end"] = common.load_avg()

    print(f"gpu_check on {card} ({device}); {'tiny kit' if args.tiny else f'Phi-3.5-mini shapes, {args.layers} layers'}, "
          f"4-bit NF4 + LoRA, batch {args.batch} x {result['tokens_per_sample']} tokens")
    print(common.table([dict(what="QLoRA train", steps=done, samples_per_s=train["samples_per_s"],
                             tokens_per_s=train["tokens_per_s"], tflops=train["model_tflops_per_s"],
                             mfu=train["mfu"], peak_gpu_gb=train.get("peak_gpu_gb")),
                        dict(what="4-bit generate", steps=gen["tokens"], tokens_per_s=gen["tokens_per_s"],
                             peak_gpu_gb=gen.get("peak_gpu_gb"))],
                       ["what", "steps", "samples_per_s", "tokens_per_s", "tflops", "mfu", "peak_gpu_gb"]))
    print(f"phases: {phases}; time to first token {gen['ttft_s']} s; wall {result['wall_s']} s", file=sys.stderr)
    common.emit(result)
    return result


if __name__ == "__main__":
    main()
