"""Time each matrix product of one LoRA layer's step at a 7B block's shapes, as autograd issues them (the same
transpositions), with cuBLAS and with cuBLASLt, and print time, bytes moved at the least and the rates.

    python scripts/lora_gemms.py [TOKENS] [REPEATS]   (defaults 8192 50; needs CUDA)
"""

import sys

import torch

BLOCK_SHAPES = [(4096, 4096, 4), (4096, 11008, 2), (11008, 4096, 1)]  # Llama-2-7B: (in, out, projections a block)


def products(tokens, width_in, width_out, r=8):
    """(name, a, b): the products of x (tokens x in) through a frozen W (out x in) and LoRA A (r x in), B (out x r)."""
    d = dict(device="cuda", dtype=torch.bfloat16)
    x, w = torch.randn(tokens, width_in, **d), torch.randn(width_out, width_in, **d) / 64
    a, b = torch.randn(r, width_in, **d) / 64, torch.randn(width_out, r, **d) / 4
    h, grad_y = torch.randn(tokens, r, **d), torch.randn(tokens, width_out, **d)
    grad_h = torch.randn(tokens, r, **d)
    return [
        ("base x @ W.t()", x, w.t()),
        ("base grad_y @ W", grad_y, w),
        ("A: x_d @ A.t()", x, a.t()),
        ("B: h @ B.t()", h, b.t()),
        ("grad_h = grad_y @ B", grad_y, b),
        ("grad_B = grad_y.t() @ h", grad_y.t(), h),
        ("grad_x_d = grad_h @ A", grad_h, a),
        ("grad_A = grad_h.t() @ x_d", grad_h.t(), x),
    ]


def timed(a, b, repeats):
    out = torch.mm(a, b)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(5):
        torch.mm(a, b, out=out)
    start.record()
    for _ in range(repeats):
        torch.mm(a, b, out=out)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats * 1e3, out  # microseconds


def main() -> None:
    tokens, repeats = (int(v) for v in (sys.argv[1:] + ["8192", "50"][len(sys.argv) - 1 :]))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {tokens} tokens, bf16, r=8")
    print("| shape (in -> out) | product | cuBLAS us | cuBLASLt us | least MB | GB/s (best) | TFLOP/s (best) |")
    print("|---|---|---|---|---|---|---|")
    for width_in, width_out, _ in BLOCK_SHAPES:
        for name, a, b in products(tokens, width_in, width_out):
            times = []
            for library in ("cublas", "cublaslt"):
                torch.backends.cuda.preferred_blas_library(library)
                times.append(timed(a, b, repeats)[0])
            best = min(times)
            mb = (a.numel() + b.numel() + a.shape[0] * b.shape[1]) * 2 / 1e6
            tflops = 2 * a.shape[0] * a.shape[1] * b.shape[1] / best / 1e6
            print(
                f"| {width_in} -> {width_out} | {name} | {times[0]:.1f} | {times[1]:.1f} | {mb:.1f} | "
                f"{mb / best * 1e3:.0f} | {tflops:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
