"""modelparallel.tensorflow: the TensorFlow front end (SMP v1's TensorFlow API).

Keras models are traced by :mod:`modelparallel.tracer.tf_capture` into the same IR the PyTorch
front end plans, and planned by the same partitioner.
"""
