"""One training step's gradients in a distributed run, for tests/test_distributed.py.

Run under torchrun (gloo): every process builds the same model, takes its share of one batch, runs the
trainer's step forward under DistributedDataParallel and backward, and saves its gradients and the FDS
statistics to OUT/rank<r>.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from elta.engine.distributed import start_processes, stop_processes
from elta.engine.trainer import StepForward

sys.path.insert(0, str(Path(__file__).parent))
from step_inputs import make_inputs, make_model_and_enhancers  # noqa: E402


def main(out: Path) -> None:
    processes, device, _ = start_processes("cpu")
    model, enhancers = make_model_and_enhancers()
    inputs = make_inputs()
    own = processes.share(range(len(inputs["mos"])))
    share = {k: v[own] if v is not None else None for k, v in inputs.items()}
    step = processes.wrap(StepForward(model, enhancers, model.forward_features, processes), device)
    terms = step(share["images"], share["mos"], share["dist"], share["weight"], share["indices"], 0)
    terms["loss"].backward()
    torch.save(
        {
            "grads": {n: p.grad for n, p in model.named_parameters()},
            "terms": {k: v.detach() for k, v in terms.items()},
            "enhancers": dict(enhancers.state_dict()),
            "rows": own,
        },
        out / f"rank{processes.rank}.pt",
    )
    dist.barrier()
    stop_processes()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
