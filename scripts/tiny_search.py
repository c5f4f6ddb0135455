"""A tiny search with one strategy, for compute-sanitizer (scripts/gpu_check.sh): every metric, a mask,
k > N, on the GPU when there is one. Prints 'ok', or why the strategy cannot run here."""
import sys

import torch

import xmodal

strategy = sys.argv[1]
device = "cuda" if torch.cuda.is_available() else "cpu"
g = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    queries = torch.rand(3, 64, generator=g).to(dtype).to(device)
    database = torch.rand(5000, 64, generator=g).to(dtype).to(device)
    mask = torch.arange(5000, device=device) % 3 != 0
    for metric in xmodal.SEARCH_METRICS:
        for k, m in ((10, None), (100, mask), (6000, None)):
            try:
                values, indices = xmodal.topk_search(queries, database, k, metric, mask=m, strategy=strategy)
            except RuntimeError as e:
                if "cannot run this search" not in str(e):
                    raise
                continue
            if device == "cuda":
                torch.cuda.synchronize()
print("ok")
