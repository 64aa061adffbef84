"""Distribution: which tf.distribute strategy runs the training, who is the chief, and how the gradients
cross the replicas (one all-reduce per step, optionally in 16 bits, with Keras' own aggregation switched off).
"""

from __future__ import annotations

import json
import os
import socket

import keras
import tensorflow as tf

STRATEGIES = ("auto", "mirrored", "multi_worker", "one_device")
ALL_REDUCE_IMPLEMENTATIONS = ("auto", "ring", "nccl")


def make_strategy(name: str = "auto") -> tf.distribute.Strategy:
    """`auto`: MultiWorkerMirroredStrategy if TF_CONFIG names several workers, else MirroredStrategy
    over all local GPUs if there are several, else the default (one-device) strategy."""
    if name not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {name!r}")
    if name == "auto":
        cluster = json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
        if len(cluster.get("worker", [])) + len(cluster.get("chief", [])) > 1:
            name = "multi_worker"
        elif len(tf.config.list_logical_devices("GPU")) > 1:
            name = "mirrored"
        else:
            return tf.distribute.get_strategy()
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")


def check_inter_op_threads(inter_op_threads: int | None) -> None:
    """`--inter_op_threads` must be None or >= 0 (None and 0: TensorFlow's choice)."""
    if inter_op_threads is not None and inter_op_threads < 0:
        raise ValueError(f"--inter_op_threads must be >= 0 (0: TensorFlow's choice), got {inter_op_threads}")


def configure_threads(inter_op_threads: int | None = None) -> str:
    """Sets TensorFlow's inter-op thread pool (how many ops may run at once) for this process and says
    what it is, for the log.

    `None` or `0` (crn-train's default): TensorFlow's own choice. `n`: n threads; Intel's guidance for
    oneDNN CPUs is one per socket, since each convolution already uses every core (measured here: no
    difference in the paper-width step on 2 cores, benchmarks/README.md). It must be set before
    TensorFlow runs anything: a value that comes too late is an error naming the flag.
    """
    check_inter_op_threads(inter_op_threads)
    if not inter_op_threads:
        return "inter-op threads: TensorFlow's choice"
    if tf.config.threading.get_inter_op_parallelism_threads() != inter_op_threads:
        try:
            tf.config.threading.set_inter_op_parallelism_threads(inter_op_threads)
        except RuntimeError as e:  # the context is initialised: the pool exists
            raise ValueError(
                f"--inter_op_threads={inter_op_threads}: TensorFlow has already started in this process, "
                f"so its inter-op threads can no longer change ({e}); set it before anything runs"
            ) from e
    return f"inter-op threads: {inter_op_threads} (--inter_op_threads)"


def localhost_workers(n: int) -> list[str]:
    """n "127.0.0.1:port" addresses of ports free right now: the worker list of a TF_CONFIG cluster
    on this machine (a local MultiWorkerMirroredStrategy run, as the tests and benchmarks start)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [f"127.0.0.1:{s.getsockname()[1]}" for s in sockets]
    finally:
        for s in sockets:
            s.close()


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True unless this is a non-chief worker of a multi-worker strategy."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


def no_gradient_aggregation(optimizer: keras.optimizers.Optimizer) -> None:
    """Makes `optimizer.apply` use the gradients it is given as they are, without summing them over replicas.

    The Trainer sums each gradient over the replicas once itself (to clip the sum and check it before
    the update, and to pass CommunicationOptions). Keras 3's TensorFlow optimizer would all-reduce them
    again inside apply() whenever it runs in a replica context (TFOptimizer._all_reduce_sum_gradients in
    keras/src/backend/tensorflow/optimizer.py, 3.15), and it offers no option to skip that (Keras 2's
    `experimental_aggregate_gradients=False` is gone); calling apply() from a cross-replica context
    instead fails on CPUs and without XLA, where it needs a merge_call. So this replaces that one
    method on the instance (on the inner optimizer of a LossScaleOptimizer, which does the update).
    tests/test_train.py counts the elements all-reduced per step, so a Keras that changes this fails there.
    """
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    if not callable(getattr(inner, "_all_reduce_sum_gradients", None)):
        raise RuntimeError(
            f"Keras {keras.__version__}: {type(inner).__name__} has no _all_reduce_sum_gradients; "
            "crn_tf.distribution.no_gradient_aggregation needs updating for this Keras version"
        )
    inner._all_reduce_sum_gradients = list  # (gradient, variable) pairs through unchanged


def task_id(strategy: tf.distribute.Strategy) -> int:
    """This worker's index in a multi-worker cluster (0 elsewhere)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    return int(resolver.task_id) if resolver is not None and resolver.task_id is not None else 0


def all_reduce_gradients(
    grads: list,
    wire_dtype: str | None = None,
    options: tf.distribute.experimental.CommunicationOptions | None = None,
) -> list:
    """The cross-replica sum of `grads` (called in a replica context): the step's only all-reduce of gradients.

    Args:
        grads: this replica's gradients.
        wire_dtype: None, `bfloat16` or `float16`: the gradients cross the replicas (and are summed) in this
            dtype, then are cast back before clipping and the update.
        options: the all-reduce's CommunicationOptions.
    """
    ctx = tf.distribute.get_replica_context()
    if ctx.num_replicas_in_sync == 1:  # nothing to sum (and no reason to round to the wire dtype)
        return grads
    if wire_dtype:  # reduced precision on the wire only: the sum is cast back before clipping and the update
        dtypes = [g.dtype for g in grads]
        grads = [tf.cast(g, wire_dtype) for g in grads]
    grads = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads, options=options)
    if wire_dtype:
        grads = [tf.cast(g, d) for g, d in zip(grads, dtypes)]
    return grads
