"""Time one NCCL all-gather the size of a sharded decoder block's weights, alone, between the GPUs of one host.

Run with `python3 -m torch.distributed.run --nproc_per_node 2 scripts/allgather_bench.py [MB ...]` (device tool,
scripts/gpu_bench.sh's environment). Each size is the gathered (whole) tensor in MB of bf16; a Llama-2-7B block
holds 202M parameters, ~101 MB as nf4 (bf16 storage). Prints, on rank 0, the median time of 20 gathers after 5
warm-up ones and the bandwidth as nccl-tests reports it (algbw = bytes gathered / time; busbw = algbw x (n-1)/n).
"""

import os
import statistics
import sys

import torch
import torch.distributed as dist


def main() -> None:
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if rank == 0:
        print("| gathered MB | processes | median ms | algbw GB/s | busbw GB/s |\n|---|---|---|---|---|")
    for mb in [float(a) for a in sys.argv[1:]] or [101.0]:
        elements = int(mb * 1e6 / 2) // world * world
        shard = torch.randn(elements // world, device="cuda", dtype=torch.bfloat16)
        whole = torch.empty(elements, device="cuda", dtype=torch.bfloat16)
        times = []
        for i in range(25):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dist.all_gather_into_tensor(whole, shard)
            end.record()
            torch.cuda.synchronize()
            if i >= 5:
                times.append(start.elapsed_time(end))
        ms = statistics.median(times)
        algbw = elements * 2 / (ms / 1e3) / 1e9
        if rank == 0:
            print(f"| {mb:g} | {world} | {ms:.3f} | {algbw:.1f} | {algbw * (world - 1) / world:.1f} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
