"""A first check that the library loads and agrees with the float64 formula."""

import numpy as np

import grouped_mae_op as gm


def test_article_counterexample_empty_group_is_not_averaged_in():
    # ids {0, 2} of 3 groups: group means 1.0 and 3.0, group 1 is empty -> 2.0 (not 1.33).
    y_true = np.zeros(4, np.float32)
    y_pred = np.array([1.0, 1.0, 3.0, 3.0], np.float32)
    ids = np.array([0, 0, 2, 2], np.int32)
    assert float(gm.grouped_mae(y_true, y_pred, ids, 3)) == 2.0


def test_build_info_matches_imported_tensorflow():
    import tensorflow as tf

    assert gm.build_info()["tf_version"] == tf.__version__
    assert np.isfinite(float(gm.grouped_mae([1.0], [2.0], [0])))
