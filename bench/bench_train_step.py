"""Training step time: bf16 autocast against fp32, the same network, batch and input, interleaved in one run.

Issue 30: on a CPU with AVX-512 BF16 (or AMX) bf16 autocast with channels-last makes a training step much cheaper
than fp32, which is what lets the GPU recipes run here in hours. One step = forward, loss, backward and AdamW
update of the bone-age network (EfficientNet-Lite0 with both heads) on a batch of random images, as
``models.train.loop.fit`` runs it. The reference is fp32 channels-last (what the loop did on a CPU before); the ratio
is reference / bf16 (higher is better). Steps alternate (fp32, bf16, fp32, ...) after one warm-up step each, so a
background job affects both alike. Multiply by the steps of an epoch (ceil(train images / batch)) for an epoch's
training time.

Run: ``.venv/bin/python bench/bench_train_step.py [--size 384] [--batch 32] [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import torch  # noqa: E402

from common import print_environment, summarise  # noqa: E402
from models.nets.networks import BoneAgeSexNet  # noqa: E402
from models.nets.precision import bf16_supported  # noqa: E402


def make_step(bf16: bool, size: int, batch: int):
    torch.manual_seed(0)
    model = BoneAgeSexNet(pretrained=False).to(memory_format=torch.channels_last).train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    male, age = torch.randint(0, 2, (batch,)).float(), torch.randn(batch)

    def step() -> float:
        began = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            pred, logit = model(x, male)
            loss = torch.nn.functional.smooth_l1_loss(pred.float(), age, beta=0.1) + \
                0.3 * torch.nn.functional.binary_cross_entropy_with_logits(logit.float(), male)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        return time.perf_counter() - began

    return step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    print_environment()
    if not bf16_supported(torch.device("cpu")):
        print("# this CPU has neither AVX-512 BF16 nor AMX: bf16 would be emulated, training stays in fp32")
        return 0
    fp32, bf16 = make_step(False, args.size, args.batch), make_step(True, args.size, args.batch)
    fp32(), bf16()  # warm-up: oneDNN picks its kernels on the first call
    ref, ours = [], []
    for _ in range(args.repeats):
        ref.append(fp32())
        ours.append(bf16())
    summarise(f"train-step-lite0-{args.size}px-b{args.batch}", "fp32 channels-last", "s/step", ref, ours,
              higher_is_better=False, as_json=args.json, note=f"{torch.get_num_threads()} threads")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
