"""Worker of the 2-process gather test: imports torch and avmoe.select.gather only (spawn re-imports this
module in each child; the full test module would import Lightning and transformers twice more)."""

from __future__ import annotations

import torch

from avmoe.select.gather import gather_batches, rank_batches


def gather_worker(rank: int, store: str, batches_file: str, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        every = torch.load(batches_file, weights_only=True)  # batch number -> (audio, visual)
        n = len(every)
        mine = {k: every[k] for k in rank_batches(n, rank, 2)}
        audio, visual = gather_batches(mine, n)
        torch.save({"audio": audio, "visual": visual, "mine": sorted(mine)}, f"{out}{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()
