"""The Gradio Space: `python app.py` serves the bundled shapes demo offline; `--repo` serves a Hub round.

Thin on purpose: flags and environment in, `mmft.app_ui` does the rest. No outbound call is needed
to start: telemetry is off, and with no repo configured the Hub client is offline too. Environment
variables already set (e.g. in the Space's settings) win over these defaults.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import socket
import sys
from pathlib import Path

# Before gradio or huggingface_hub are imported: both read these once, at import time.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from mmft.config import DTYPE_NAMES, QUANTIZE_MODES, whole_number  # noqa: E402  (light: no torch)

DEMO_ROUND = Path(__file__).resolve().parent / "demo" / "round"


QUANTIZE = list(QUANTIZE_MODES)
MAX_THREADS = 1024  # torch overflows past 2**31, and 100,000 threads ran out of memory blaming a file


TRUE, FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


_positive = whole_number(1)


def _int(environ, name: str) -> int | None:
    value = (environ.get(name) or "").strip()
    if not value:
        return None
    try:
        return _positive(value)
    except argparse.ArgumentTypeError as err:
        sys.exit(f"app.py: {name}: {err}")


def _flag(environ, name: str) -> bool:
    value = (environ.get(name) or "").strip().lower()
    if value not in TRUE + FALSE:
        sys.exit(f"app.py: {name}={value!r}: use one of {', '.join(TRUE)} (on) or {', '.join(FALSE[1:])} (off)")
    return value in TRUE


def parse_args(argv=None, environ=os.environ) -> argparse.Namespace:
    """Every flag has an environment variable (a Space's settings set those); a flag given wins."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", default=environ.get("MMFT_REPO") or None,
                        help="Hub repo OWNER/NAME (or a local round folder) to serve [env MMFT_REPO]; "
                             "unset: the bundled shapes demo round")
    parser.add_argument("--revision", default=environ.get("MMFT_REVISION") or None,
                        help="round-N tag, branch or commit id [env MMFT_REVISION]; default: main")
    parser.add_argument("--demo", action="store_true", default=_flag(environ, "MMFT_DEMO"),
                        help="serve the bundled shapes demo round even if a repo is set [env MMFT_DEMO=1]")
    parser.add_argument("--host", default=environ.get("GRADIO_SERVER_NAME") or "127.0.0.1",
                        help="address to listen on [env GRADIO_SERVER_NAME; Spaces set 0.0.0.0]")
    parser.add_argument("--port", type=_positive, default=_int(environ, "GRADIO_SERVER_PORT") or 7860,
                        help="[env GRADIO_SERVER_PORT] (default: 7860)")
    parser.add_argument("--device", default=environ.get("MMFT_DEVICE") or None,
                        help="cpu, cuda, cuda:1 ... [env MMFT_DEVICE] (default: CUDA when present)")
    parser.add_argument("--dtype", default=environ.get("MMFT_DTYPE") or None,
                        help="float32, bfloat16 or float16 [env MMFT_DTYPE] (default: bf16 on CUDA; around int8 on CPU, "
                             "bf16 with AMX, else float32; unquantized on CPU, bf16 where oneDNN has it, else "
                             "float32; the demo: float32)")
    parser.add_argument("--quantize", nargs="?", const="nf4", default=environ.get("MMFT_QUANTIZE") or None,
                        choices=QUANTIZE,
                        help="nf4 (bitsandbytes 4-bit, the default on CUDA), int8 (int8 linears under LoRA, the "
                             "default on CPU, see docs/benchmarks.md) or none [env MMFT_QUANTIZE]")
    parser.add_argument("--threads", type=_positive, default=_int(environ, "MMFT_THREADS"),
                        help="CPU threads for torch [env MMFT_THREADS] (default: torch's choice; a free CPU "
                             "Space has 2 vCPUs)")
    parser.add_argument("--asr-model", default=environ.get("MMFT_ASR_MODEL") or None,
                        help="speechbrain ASR model id [env MMFT_ASR_MODEL] (default: mmft.speech.DEFAULT_MODEL_ID)")
    parser.add_argument("--cache-size", type=_positive, default=_int(environ, "MMFT_CACHE_SIZE") or 4,
                        help="rounds kept loaded for the round picker; rounds on the same base share it and cost "
                             "their adapter + projector only [env MMFT_CACHE_SIZE] (default: 4)")
    parser.add_argument("--max-bases", type=_positive, default=_int(environ, "MMFT_MAX_BASES") or 1,
                        help="base models (LM + CLIP) kept loaded; a round on another base drops the least recently "
                             "used one first when this many are loaded [env MMFT_MAX_BASES] (default: 1)")
    parser.add_argument("--check", action="store_true",
                        help="check the flags and environment, say what is wrong, and exit without serving "
                             "(`python -m mmft.space` runs it on a Space's variables before deploying)")
    args = parser.parse_args(argv)
    if args.quantize is not None and args.quantize not in QUANTIZE:  # argparse checks flags, not env defaults
        parser.error(f"MMFT_QUANTIZE={args.quantize!r}: choose one of {', '.join(QUANTIZE)}")
    if args.port > 65535:
        parser.error(f"--port / GRADIO_SERVER_PORT {args.port}: use a port from 1 to 65535")
    if args.dtype is not None and args.dtype not in DTYPE_NAMES:
        parser.error(f"--dtype / MMFT_DTYPE {args.dtype!r}: use one of {', '.join(sorted(DTYPE_NAMES))}")
    if args.threads is not None and args.threads > MAX_THREADS:  # one bound on any machine: mmft.space checks a
        # Space's variables on the machine that deploys it
        parser.error(f"--threads / MMFT_THREADS {args.threads}: use 1 to {MAX_THREADS} (a free CPU Space has 2 vCPUs)")
    if args.device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?|mps", args.device):
        parser.error(f"--device / MMFT_DEVICE {args.device!r}: use cpu, cuda, cuda:N or mps")
    args.repo, args.revision = args.repo or None, args.revision or None  # --repo "" is unset, as MMFT_REPO="" is
    if args.revision and not args.repo:  # a Space with MMFT_REVISION alone stays up, and says why it serves the demo
        print(f"warning: --revision / MMFT_REVISION {args.revision!r} is ignored: there is no --repo / MMFT_REPO, "
              "so the bundled demo round is served", file=sys.stderr)
    return args


def set_env_defaults(args: argparse.Namespace, environ=os.environ) -> None:
    """With no repo to pull from, nothing needs the Hub: keep its client offline unless told otherwise."""
    if args.demo or not args.repo:
        environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.check:
        print("app.py: the flags and environment are usable")
        return
    set_env_defaults(args)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("mmft").setLevel(logging.INFO)
    import torch  # heavy imports after parsing: --help stays instant

    from mmft.app_ui import Settings, create_app, launch  # imports gradio and huggingface_hub: after the env

    if args.device and args.device != "cpu":
        index = int(args.device.partition(":")[2] or 0)
        here = (torch.cuda.device_count() > index if args.device.startswith("cuda")
                else torch.backends.mps.is_available())
        if not here:
            sys.exit(f"app.py: --device / MMFT_DEVICE {args.device!r}: no such device here "
                     "(unset it: CUDA when present)")
    if args.threads:
        torch.set_num_threads(args.threads)
    with socket.socket() as probe:  # before minutes of loading, not after them
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a closing port is free
        try:
            probe.bind((args.host, args.port))
        except OSError as err:
            sys.exit(f"app.py: cannot listen on {args.host}:{args.port} (--host / --port): {err.strerror or err}")
    settings = Settings(demo_round=DEMO_ROUND, repo=args.repo, revision=args.revision, demo=args.demo,
                        device=args.device, dtype=args.dtype, quantize=args.quantize, asr_model=args.asr_model,
                        cache_size=args.cache_size, max_bases=args.max_bases)
    try:
        app = create_app(settings)
    except Exception as err:  # a missing demo round, a broken local round folder (a damaged file: SafetensorError)
        sys.exit(f"app.py: cannot start: {err}")
    launch(app, args.host, args.port)


if __name__ == "__main__":
    main()
