"""Streaming statistics of the layer inputs a merge fits, one storage class per way of keeping them
(``d x d`` sums, packed triangles, token space, row space) behind :class:`StageStatistics`, and
SSR-Merge's ``R x R`` projection sums (:class:`SsrStatistics`)."""

from .common import PROBE_DTYPE, PROBES, TOKEN_FRACTION, LayerPlan, LayerWeights, sum_of_squares
from .ssr import SsrStatistics, ssr_router
from .stage import StageStatistics

__all__ = ["PROBE_DTYPE", "PROBES", "TOKEN_FRACTION", "LayerPlan", "LayerWeights", "SsrStatistics",
           "StageStatistics", "ssr_router", "sum_of_squares"]
