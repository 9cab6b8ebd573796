"""Training-step throughput per backbone: baseline vs TFA + FLSA, float32 vs bf16 autocast (and compile).

For each backbone, runs the trainer's own step (``Precision.features`` of the backbone, then
``elta.engine.trainer.loss_terms`` + backward + Adam) on random images in four variants, alternated step by
step after the warm-up so that all see the same machine state (the order rotates every round):

  fp32             float32 throughout, no enhancers
  fp32 tfa+flsa    float32, TFA + FLSA (weight 1)
  bf16             backbone under bf16 autocast (``Precision.create("bf16", ...)``), head and losses float32
  bf16 tfa+flsa    the same with TFA + FLSA

bf16 runs where PyTorch supports it: the CPU and CUDA GPUs with bf16; elsewhere its columns say why not.
``--compile`` adds "bf16+compile" (no enhancers, ``elta.engine.precision.compile_backbone`` on a copy of
the model), which is worth it on GPUs; it is off by default because compiling takes minutes on a CPU.
A variant that fails (an op without bf16 support, say) is reported in the table with its error.

Prints the machine, then a Markdown table of images/s (batch / median step time) and the ratios
tfa+flsa / baseline in each precision and bf16 / fp32 of the baseline. Each backbone has a default input
size, batch and step count for a CPU run (larger batches on CUDA); override them for all backbones with
``--image-size`` / ``--batch-size`` / ``--steps``, or per backbone as ``name:size:batch``. Usage:

    python benchmarks/train_step.py [--backbones test_vit,tf_efficientnet_lite0:224:16,...]
        [--steps N] [--warmup N] [--quick] [--device auto|cpu|cuda] [--compile] [--show-steps]
"""

from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass

import torch
from common import alternated, ava_model, machine, random_batch, script_parser, timed

from elta.data.dataset import Batch
from elta.engine.precision import Precision, compile_backbone
from elta.engine.runtime import resolve_device
from elta.engine.trainer import loss_terms
from elta.enhancers import build_enhancers

# name: (input px, CPU batch, CUDA batch, CPU timed steps per variant)
DEFAULTS = {
    "test_vit": (64, 32, 256, 30),
    "test_convnext": (64, 32, 256, 30),
    "test_resnet": (64, 32, 256, 30),
    "test_efficientnet": (64, 32, 256, 30),
    "tf_efficientnet_lite0": (224, 16, 128, 10),
    "swinv2_tiny_window8_256": (256, 8, 64, 6),
    "swinv2_base_window8_256": (256, 4, 32, 4),
}
CUDA_STEPS = 20
# ratio column: (variant, the baseline it is divided by)
RATIOS = {
    "tfa+flsa / base fp32": ("fp32 tfa+flsa", "fp32"),
    "tfa+flsa / base bf16": ("bf16 tfa+flsa", "bf16"),
    "bf16 / fp32 base": ("bf16", "fp32"),
}
COMPILE_RATIO = {"compile / bf16 base": ("bf16+compile", "bf16")}


@dataclass
class Variant:
    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    precision: Precision | None  # None: the precision is unsupported here (see error)
    enhancers: torch.nn.Module
    error: str = ""


def step(v: Variant, batch: Batch) -> None:
    """The trainer's step: backbone under the precision's autocast, float32 losses, backward, Adam."""
    features = v.precision.features(v.model.forward_features, batch.images)
    terms = loss_terms(v.model, v.enhancers, features, batch)
    v.optimizer.zero_grad(set_to_none=True)
    terms["loss"].backward()
    v.optimizer.step()


def variants(backbone: str, size: int, device: torch.device, compile_: bool) -> list[Variant]:
    torch.manual_seed(0)
    model = ava_model(backbone, size).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    plain = build_enhancers([])
    elta = build_enhancers([{"name": "tfa"}, {"name": "flsa", "weight": 1.0}]).to(device)
    fp32 = Precision.create("off", device)
    try:
        bf16, bf16_error = Precision.create("bf16", device), ""
    except ValueError as exc:
        bf16, bf16_error = None, f"unsupported: {exc}"
    out = [
        Variant("fp32", model, optimizer, fp32, plain),
        Variant("fp32 tfa+flsa", model, optimizer, fp32, elta),
        Variant("bf16", model, optimizer, bf16, plain, bf16_error),
        Variant("bf16 tfa+flsa", model, optimizer, bf16, elta, bf16_error),
    ]
    if compile_:
        compiled = copy.deepcopy(model)
        error = bf16_error
        if not error:
            try:
                compile_backbone(compiled)
            except RuntimeError as exc:
                error = f"failed: {exc}"
        opt = torch.optim.Adam(compiled.parameters(), lr=1e-5)
        out.append(Variant("bf16+compile", compiled, opt, bf16, plain, error))
    return out


def run_backbone(
    backbone: str, size: int, b: int, steps: int, warmup: int, device: torch.device, compile_: bool
) -> tuple[dict[str, float | str], dict[str, list[float]]]:
    """images/s per variant (or the error text of a variant that could not run), and the step times."""
    vs = variants(backbone, size, device, compile_)
    batch = random_batch(b, size, device)
    for v in vs:  # warm-up; a variant that fails here is left out of the timing
        if v.error:
            continue
        try:
            for _ in range(warmup):
                timed(device, lambda v=v: step(v, batch))
        except Exception as exc:  # report, don't hide: e.g. an op without a bf16 kernel
            v.error = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    live = {v.name: (lambda v=v: step(v, batch)) for v in vs if not v.error}
    times = alternated(device, live, steps if live else 0)
    return {v.name: v.error or b / statistics.median(times[v.name]) for v in vs}, times


def parse_backbones(text: str) -> list[tuple[str, int | None, int | None]]:
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, size, batch, *_ = item.split(":") + ["", ""]
        out.append((name, int(size) if size else None, int(batch) if batch else None))
    return out


def main() -> None:
    parser = script_parser(__doc__)
    parser.add_argument(
        "--backbones",
        default=",".join(DEFAULTS),
        help="comma-separated timm names, each optionally name:size:batch (default: %(default)s)",
    )
    parser.add_argument("--image-size", type=int, help="input px for every backbone (default: per backbone)")
    parser.add_argument("--batch-size", type=int, help="batch for every backbone (default: per backbone)")
    parser.add_argument("--steps", type=int, help="timed steps per variant (default: per backbone)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first (default 2)")
    parser.add_argument("--quick", action="store_true", help="2 timed steps per variant, a smoke test")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--compile", action="store_true", help="add a bf16+compile variant")
    parser.add_argument("--show-steps", action="store_true", help="print every timed step (ms)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device: {device.type} is not benchmarked here; use cpu or cuda")
    print(machine(device))
    cols = ["fp32", "fp32 tfa+flsa", "bf16", "bf16 tfa+flsa"] + (["bf16+compile"] if args.compile else [])
    ratios = RATIOS | (COMPILE_RATIO if args.compile else {})
    print(f"img/s per variant (batch / median step), warm-up {args.warmup} step(s) per variant\n")
    print(f"| backbone | input | batch | steps | {' | '.join(cols)} | {' | '.join(ratios)} |")
    print(f"|---|---|---|---|{'---|' * (len(cols) + len(ratios))}")
    for name, size, batch in parse_backbones(args.backbones):
        d_size, d_cpu, d_cuda, d_steps = DEFAULTS.get(name, (224, 8, 64, 4))
        size = args.image_size or size or d_size
        b = args.batch_size or batch or (d_cuda if device.type == "cuda" else d_cpu)
        steps = 2 if args.quick else args.steps or (CUDA_STEPS if device.type == "cuda" else d_steps)
        rate, times = run_backbone(name, size, b, steps, args.warmup, device, args.compile)
        if args.show_steps:
            for v, ts in times.items():
                print(f"  {name} {v}: steps (ms) {', '.join(f'{t * 1000:.0f}' for t in ts)}", flush=True)

        def ratio(a: str, base: str, rate=rate) -> str:
            x, y = rate.get(a), rate.get(base)
            return f"{x / y:.3f}" if isinstance(x, float) and isinstance(y, float) else "–"

        cells = [f"{rate[c]:.1f}" if isinstance(rate[c], float) else str(rate[c]) for c in cols]
        rs = [ratio(a, base) for a, base in ratios.values()]
        print(f"| {name} | {size} px | {b} | {steps} | {' | '.join(cells)} | {' | '.join(rs)} |", flush=True)


if __name__ == "__main__":
    main()
