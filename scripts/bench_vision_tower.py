"""Time a CLIP-L/336-shaped vision tower three ways, side by side, with random weights.

    python scripts/bench_vision_tower.py                       # CPU, batch 1, full 24 layers
    python scripts/bench_vision_tower.py --device cuda --dtype bfloat16 --batch 8 --iters 20
    python scripts/bench_vision_tower.py --layers 6 --iters 3  # quick run

Variants (same weights, interleaved round-robin after warm-up, medians reported):
  stock    SDPA tower with output_hidden_states, feature = hidden_states[-2] (HF LLaVA's path)
  capture  VisionZip: SDPA through the feature layer only, hooks at that layer, plus compression
  eager    eager attention + output_attentions + output_hidden_states, plus compression (the
           reference approach: every layer stores its N x N maps)
  stock_to_feature  SDPA through the feature layer only, no hooks: isolates the hook cost
Peak memory: on CUDA, torch.cuda.max_memory_allocated per variant (bytes above the weights). On
CPU, each variant runs once in a fresh subprocess and the figure is the rise of the process's peak
resident set (VmHWM, reset through /proc/self/clear_refs) over its resident set with the weights
loaded: allocator-level, so approximate, but it does see torch's allocations.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from visionzip_core.algorithm import visionzip_compress
from visionzip_core.capture import capture_feature_layer
from visionzip_core.config import VisionZipConfig

VARIANTS = ("stock", "capture", "eager", "stock_to_feature")
FEATURE_LAYER = -2


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3, help="timed rounds (each runs every variant once)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--layers", type=int, default=24, help="encoder layers (24 = CLIP-L)")
    parser.add_argument("--dominant", type=int, default=54)
    parser.add_argument("--contextual", type=int, default=10)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--measure-memory", choices=VARIANTS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def build_tower(args) -> CLIPVisionModel:
    config = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=args.layers,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return CLIPVisionModel(config).to(args.device, getattr(torch, args.dtype)).eval()


def make_runners(tower: CLIPVisionModel, pixel_values: torch.Tensor, vz: VisionZipConfig):
    num_layers = len(tower.encoder.layers)
    attn_layer = tower.encoder.layers[num_layers + FEATURE_LAYER]

    def stock():
        return tower(pixel_values, output_hidden_states=True).hidden_states[FEATURE_LAYER]

    def capture():
        got = capture_feature_layer(tower, pixel_values, FEATURE_LAYER)
        return visionzip_compress(got.hidden, got.cls_attention, got.keys, vz)

    def stock_to_feature():
        hidden = tower.pre_layrnorm(tower.embeddings(pixel_values))
        for layer in tower.encoder.layers[: num_layers + 1 + FEATURE_LAYER]:
            hidden = layer(hidden, None)
        return hidden

    def eager():
        keys = {}

        def hook(_module, _inputs, output):
            b, n, _ = output.shape
            keys["k"] = output.view(b, n, attn_layer.self_attn.num_heads, -1).mean(2)

        tower.set_attn_implementation("eager")
        handle = attn_layer.self_attn.k_proj.register_forward_hook(hook)
        try:
            out = tower(pixel_values, output_attentions=True, output_hidden_states=True)
        finally:
            handle.remove()
            tower.set_attn_implementation("sdpa")
        cls_attention = out.attentions[FEATURE_LAYER][:, :, 0, :].sum(1)
        return visionzip_compress(out.hidden_states[FEATURE_LAYER], cls_attention, keys["k"], vz)

    return {"stock": stock, "capture": capture, "eager": eager, "stock_to_feature": stock_to_feature}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise KeyError(field)


def reset_peak_rss() -> float:
    """Reset the kernel's peak-RSS mark (Linux ``clear_refs`` 5) and return the current RSS in MiB.

    Building the tower allocates temporaries, so without the reset its high-water mark would hide
    the forward pass's own peak.
    """
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    return _status_mib("VmRSS")


def measure_memory_in_this_process(args) -> None:
    """Subprocess mode (CPU): one run of one variant; prints JSON with the peak-RSS rise in MiB."""
    tower = build_tower(args)
    pixel_values = torch.randn(args.batch, 3, 336, 336, device=args.device, dtype=getattr(torch, args.dtype))
    runners = make_runners(
        tower, pixel_values, VisionZipConfig(dominant=args.dominant, contextual=args.contextual)
    )
    before = reset_peak_rss()
    with torch.inference_mode():
        runners[args.measure_memory]()
    print(json.dumps({"variant": args.measure_memory, "peak_rise_mib": _status_mib("VmHWM") - before}))


def peak_memory(args, tower, runners) -> dict[str, float]:
    if args.device.startswith("cuda"):
        peaks = {}
        for name in VARIANTS:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            with torch.inference_mode():
                runners[name]()
            sync(args.device)
            peaks[name] = (torch.cuda.max_memory_allocated() - base) / 2**20
        return peaks
    peaks = {}
    for name in VARIANTS:
        cmd = [
            sys.executable,
            __file__,
            "--measure-memory",
            name,
            "--batch",
            str(args.batch),
            "--device",
            args.device,
        ]
        cmd += ["--dtype", args.dtype, "--layers", str(args.layers)]
        cmd += ["--dominant", str(args.dominant), "--contextual", str(args.contextual)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        peaks[name] = json.loads(out.strip().splitlines()[-1])["peak_rise_mib"]
    return peaks


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.measure_memory:
        measure_memory_in_this_process(args)
        return 0
    vz = VisionZipConfig(dominant=args.dominant, contextual=args.contextual)
    tower = build_tower(args)
    vz.check_fits((336 // 14) ** 2 + 1)
    pixel_values = torch.randn(args.batch, 3, 336, 336, device=args.device, dtype=getattr(torch, args.dtype))
    runners = make_runners(tower, pixel_values, vz)

    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    with torch.inference_mode():
        for round_ in range(args.warmup + args.iters):
            # Rotate the starting variant so none always runs right after the same neighbour.
            order = VARIANTS[round_ % len(VARIANTS) :] + VARIANTS[: round_ % len(VARIANTS)]
            for name in order:
                sync(args.device)
                start = time.perf_counter()
                runners[name]()
                sync(args.device)
                if round_ >= args.warmup:
                    times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    peaks = {} if args.no_memory else peak_memory(args, tower, runners)

    print(
        f"CLIP-L/336-shaped tower: {args.layers} layers, hidden 1024, 16 heads, 577 tokens; batch {args.batch}, "
        f"{args.dtype} on {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}; "
        f"VisionZip {vz.dominant}+{vz.contextual}; {args.iters} timed rounds after {args.warmup} warm-up"
    )
    mem_label = "peak MiB above weights" if args.device.startswith("cuda") else "peak RSS rise MiB"
    print(f"{'variant':<18}{'median s':>10}{'min s':>10}{mem_label:>26}")
    for name in VARIANTS:
        mem = f"{peaks[name]:.0f}" if name in peaks else "-"
        print(f"{name:<18}{median[name]:>10.3f}{min(times[name]):>10.3f}{mem:>26}")
    print(f"capture / stock            = {median['capture'] / median['stock']:.3f}  (target <= 1.03)")
    print(f"capture / eager            = {median['capture'] / median['eager']:.3f}  (target < 1)")
    print(
        f"capture / stock_to_feature = {median['capture'] / median['stock_to_feature']:.3f}  (hook + score overhead)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
