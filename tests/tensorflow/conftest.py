"""TensorFlow test set-up: quiet logs, two logical CPU devices and few threads, fixed before
TensorFlow runs its first op (the machine's cores are shared); every test here skips without
TensorFlow."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
tf = pytest.importorskip("tensorflow")

try:
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(2)
    _cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        _cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(4)])
except RuntimeError:  # TensorFlow already initialised by an earlier test module
    pass
