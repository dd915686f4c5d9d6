"""grouped_mae_op: an exact, fused grouped mean absolute error for TensorFlow and Keras.

    loss = mean over present groups g of  sum_{i in g} w_i |y_pred_i - y_true_i| / sum_{i in g} w_i

Public API: `grouped_mae`, `grouped_mae_stats`, `reference` (pure TF, same semantics),
`loss` (Keras loss), `metrics` (Keras metric), `bench` (microbenchmarks).
"""

from grouped_mae_op._loader import build_info
from grouped_mae_op.ops import grouped_mae, grouped_mae_stats

__version__ = "0.1.0"
__all__ = ["grouped_mae", "grouped_mae_stats", "build_info", "__version__"]
