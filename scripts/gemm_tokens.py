"""Time a 7B block's frozen base products (bf16 cuBLAS, as autograd issues them) at several token counts, to see
whether the packed step's token count itself (which cuBLAS's tile choice depends on) changes their rate.

    python scripts/gemm_tokens.py [TOKENS ...]   (needs CUDA; default: CH's traced steps and multiples near them)
    PASSES=3 python scripts/gemm_tokens.py 7040:8193:16   (a range; each pass in a new random order)
    BLAS=cublaslt python scripts/gemm_tokens.py ...       (torch's preferred BLAS library; default cublas)

Per token count: the forward (and recompute) products x @ W.t() and the input-gradient products grad_y @ W of the
seven projections of one Llama-2-7B block, in microseconds, and the rate counting 2 * tokens * in * out a product.
With PASSES > 1 the block's time is the median over the passes (of an even count, the middle two's mean), and the
spread (max / min) is printed with it, so that clock changes (power, heat) show as spread rather than as a difference
between token counts.
"""

import os
import random
import statistics
import sys

import torch
from lora_gemms import BLOCK_SHAPES, timed  # scripts/ is on the path when this runs as a script

DEFAULT = [7168, 7183, 7232, 7296, 7313, 7424, 8064, 8128, 8131, 8132, 8133, 8192]


def block_us(tokens, weights, d):
    """(forward us, input-gradient us) of one block's seven base products at this token count."""
    forward = backward = 0.0
    for width_in, width_out, count in BLOCK_SHAPES:
        w = weights[(width_in, width_out)]
        x = torch.randn(tokens, width_in, **d)
        grad_y = torch.randn(tokens, width_out, **d)
        forward += count * timed(x, w.t(), 30)[0]
        backward += count * timed(grad_y, w, 30)[0]
    return forward, backward


def token_counts(args):
    counts = []
    for arg in args:
        if ":" in arg:
            counts.extend(range(*(int(v) for v in arg.split(":"))))
        else:
            counts.append(int(arg))
    return counts or DEFAULT


def main() -> None:
    tokens_list = token_counts(sys.argv[1:])
    passes = int(os.environ.get("PASSES", "1"))
    library = os.environ.get("BLAS", "cublas")
    torch.backends.cuda.preferred_blas_library(library)
    d = dict(device="cuda", dtype=torch.bfloat16)
    weights = {(i, o): torch.randn(o, i, **d) / 64 for i, o, _ in BLOCK_SHAPES}
    times: dict[int, list[tuple[float, float]]] = {t: [] for t in tokens_list}
    for done in range(passes):
        order = list(tokens_list) if done == 0 else random.Random(done).sample(tokens_list, len(tokens_list))
        for tokens in order:
            times[tokens].append(block_us(tokens, weights, d))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {library} bf16; us a block (7 projections)")
    print(
        f"{passes} pass(es); block us: the median over the passes (of an even count, the middle two's mean); forward "
        "and input-grad us: the middle pass by block time (of an even count, the slower middle one); spread: slowest "
        "pass / fastest"
    )
    print("| tokens | tokens % 128 | forward us | input-grad us | block us | spread | ns a token | TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|")
    for tokens in tokens_list:
        totals = [f + b for f, b in times[tokens]]
        forward, backward = sorted(times[tokens], key=sum)[len(totals) // 2]
        total = statistics.median(totals)
        flops = 2 * 2 * tokens * sum(i * o * c for i, o, c in BLOCK_SHAPES)
        print(
            f"| {tokens} | {tokens % 128} | {forward:.0f} | {backward:.0f} | {total:.0f} | {max(totals) / min(totals):.3f} "
            f"| {total / tokens * 1e3:.1f} | {flops / total / 1e6:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
