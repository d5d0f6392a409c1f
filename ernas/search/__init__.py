"""Architecture search: the objective (task + latency + entropy) and the bi-level loop."""
from ernas.search.config import SearchConfig
from ernas.search.loop import run_search
from ernas.search.objective import (EntropySchedule, LatencyLoss, SearchObjective,
                                    normalized_entropy)

__all__ = ["EntropySchedule", "LatencyLoss", "SearchConfig", "SearchObjective",
           "normalized_entropy", "run_search"]
