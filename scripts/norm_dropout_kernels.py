"""Profile the compiled kernels of an attention sublayer's input side at a 7B block's shape: a Llama RMSNorm, then
three LoRA dropouts (q/k/v's) feeding three rank-8 A products and the base products, forward and backward. Variants:
static or dynamic token count (the runner compiles blocks with dynamic=True), dropout on or off, nn.Dropout or
HashDropout, the latter with inductor's random ops (its keys then drawn again in the kernel, for every element) and
with aten's (`fallback_random`, as the runner sets for lora.hash_dropout). Prints each variant's step time and its
slowest generated kernels per call.

    python scripts/norm_dropout_kernels.py [TOKENS] [REPEATS]   (defaults 8192 20; needs CUDA)

ONLY="nn.Dropout,fallback" (comma-separated parts of names) runs only the variants whose name contains one of them.
"""

import os
import statistics
import sys
import time

import torch
import torch._inductor.config
from torch.profiler import ProfilerActivity, profile

from qlora_recipes.hash_dropout import HashDropout


class Side(torch.nn.Module):
    def __init__(self, width, dropout):
        super().__init__()
        d = dict(device="cuda", dtype=torch.bfloat16)
        self.norm = torch.nn.Parameter(torch.ones(width, **d))
        self.base = [torch.randn(width, width, **d) / 64 for _ in range(3)]
        self.a = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(8, width, **d) / 64) for _ in range(3))
        self.b = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(width, 8, **d) / 4) for _ in range(3))
        self.drop = torch.nn.ModuleList(dropout() for _ in range(3))

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)
        y = self.norm * h.to(x.dtype)
        out = 0
        for w, a, b, d in zip(self.base, self.a, self.b, self.drop, strict=True):
            out = out + (y @ w.t() + (d(y) @ a.t()) @ b.t() * 2.0).float().square().mean()
        return out


def run(name, dynamic, dropout, tokens, repeats, fallback_random=False):
    torch._dynamo.reset()
    torch._inductor.config.fallback_random = fallback_random
    torch.manual_seed(0)
    model = Side(4096, dropout)
    step = torch.compile(model, dynamic=dynamic)
    x = torch.randn(tokens, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    if dynamic:
        torch._dynamo.mark_dynamic(x, 0)
    times = []
    for i in range(repeats + 3):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step(x).backward()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - start)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step(x).backward()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.key.startswith("triton")]
    kernels.sort(key=lambda e: -e.device_time_total)
    print(f"\n## {name}: median step {statistics.median(times) * 1e3:.3f} ms")
    for e in kernels[:6]:
        print(f"  {e.device_time_total / e.count:8.1f} us/call x{e.count // 5}  {e.key[:110]}")


def main() -> None:
    tokens, repeats = (int(v) for v in (sys.argv[1:] + ["8192", "20"][len(sys.argv) - 1 :]))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {tokens} x 4096 bf16")
    for name, dynamic, dropout, *fallback_random in [
        ("static, nn.Dropout", False, lambda: torch.nn.Dropout(0.1)),
        ("dynamic, nn.Dropout", True, lambda: torch.nn.Dropout(0.1)),
        ("dynamic, HashDropout, inductor's random", True, lambda: HashDropout(0.1)),
        ("dynamic, HashDropout, fallback_random", True, lambda: HashDropout(0.1), True),
        ("dynamic, no dropout", True, torch.nn.Identity),
        ("static, no dropout", False, torch.nn.Identity),
    ]:
        if any(part in name for part in os.environ.get("ONLY", name).split(",")):
            run(name, dynamic, dropout, tokens, repeats, *fallback_random)


if __name__ == "__main__":
    main()
