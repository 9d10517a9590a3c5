"""Benchmarks: merge quality against the baselines, speed and memory against the forward floor.

Every benchmark process asks PyTorch's CPU allocator for transparent huge pages on large tensors
(``THP_MEM_ALLOC_ENABLE=1``, read once, before the first allocation). Without it each large
activation or statistics matrix is paid for in 4 KB page faults, and how many depends on what
the process freed before (glibc returns large blocks to the system), so the same forward pass
measured early or late in one run differed by 20-25% on the reference machine; with it the merge
and its floor are measured under the same conditions. Set ``THP_MEM_ALLOC_ENABLE=0`` to compare.
It changes nothing on CUDA.
"""

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
