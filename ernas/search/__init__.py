"""Architecture search: the objective (task + latency + entropy) and the bi-level loop."""
from ernas.search.loop import SearchConfig, run_search, step_batches
from ernas.search.objective import (EntropySchedule, LatencyLoss, SearchObjective, batch_psnr, l1,
                                    normalized_entropy, psnr_loss)

__all__ = ["EntropySchedule", "LatencyLoss", "SearchConfig", "SearchObjective", "batch_psnr", "l1",
           "normalized_entropy", "psnr_loss", "run_search", "step_batches"]
