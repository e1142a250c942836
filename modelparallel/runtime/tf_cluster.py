"""Several processes on TensorFlow's own cluster runtime: a ``tf.distribute.Server`` per process,
rank 0 the one client that places the stages on ``/job:worker/task:K`` devices, and a mailbox per
process through which rank 0 hands every other rank what it needs to run the same script.

Note [tf cluster process model]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
An SMP script runs on every rank. Across processes, each process starts a TensorFlow server for
task ``rank`` of job ``worker`` (the cluster from ``TF_CONFIG``, or from the launcher's
``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``: :func:`cluster_from_env`). Rank 0 is the
*driver*: it connects its eager context to the cluster as an extra client job, so the step's one
``tf.function`` places stage ``s`` on a device of task ``s * W // p`` and TensorFlow's runtime moves
the activations and gradients between the processes over its own gRPC channels (Note [op
placement] and Note [schedule dependencies] in ``tf_pipeline.py`` are unchanged). The variables
are the driver's (its client device); each stage reads the weights it needs from there.

Every other rank is a *follower*: its server runs the ops the driver places on it (in the
server's threads, while its Python thread waits), and its script goes on as written. A follower's
``smp.step`` call does not run the body: it traces the body once (to know the outputs'
structure and to build its copy of the model) and returns the outputs the driver computed,
received from its mailbox. A follower's model is a replica: the driver sends its weights when it
partitions, and the follower's own ``apply_gradients`` of the received gradients keeps it equal
to the driver's, so code after the step (metrics, ``apply_gradients``, prints, the model's
weights) sees on every rank what it sees on rank 0. The cost is a copy of the model and of the
step's outputs (gradients included) on every follower; the measurements are in
docs/tensorflow.md.

The mailbox of rank ``k`` is a string ``FIFOQueue`` on task ``k``'s CPU, shared by name, filled
and emptied through graph-mode sessions on the processes' own servers (TensorFlow's runtime, not
a transport of ours; TensorFlow's collective send/recv timed out in every point-to-point use, and
a queue created by the driver's eager context is not visible to the follower's sessions, so both
ends use sessions). A message is a pickle of ``(source, tag, payload)``; a receive keeps
messages of other tags or sources for their own receive. A receive waits at most the timeout
(``MP_TF_TIMEOUT_S``, default 600 s) and then raises :class:`StepTimeoutError`, no hang.
"""

from __future__ import annotations

import json
import os
import pickle
import threading
from collections import defaultdict, deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from modelparallel.errors import ConfigError, StepTimeoutError

__all__ = ["ClusterConfig", "TFCluster", "cluster_from_env", "current_cluster", "start_cluster"]


@dataclass(frozen=True)
class ClusterConfig:
    """Where the processes of one job are.

    Attributes:
        workers: ``host:port`` of every task of job ``worker``, by rank.
        rank: This process's task index.
        local_rank: This process's index on its host.
        local_size: Processes on this host.
    """

    workers: tuple[str, ...]
    rank: int
    local_rank: int = 0
    local_size: int = 1

    def __post_init__(self) -> None:
        if len(self.workers) < 2:
            raise ConfigError(f"a cluster needs 2 or more workers, got {list(self.workers)}")
        if not 0 <= self.rank < len(self.workers):
            raise ConfigError(f"rank {self.rank} is outside 0..{len(self.workers) - 1} of the "
                              f"cluster {list(self.workers)}")

    @property
    def size(self) -> int:
        """The number of processes."""
        return len(self.workers)


def cluster_from_env(env: Mapping[str, str] | None = None) -> ClusterConfig | None:
    """The cluster of this job: ``TF_CONFIG`` (job ``worker``), else the launcher's
    ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` (one host: task ``k`` listens on
    ``MASTER_PORT + 1 + k``), else None (one process).

    Raises:
        ConfigError: for a ``TF_CONFIG`` without job ``worker`` or of another task type, or for
            launcher variables spanning several hosts (give those a ``TF_CONFIG``).

    Example:
        >>> env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "29500"}
        >>> cluster_from_env(env).workers
        ('h:29501', 'h:29502')
        >>> cluster_from_env({}) is None
        True
    """
    env = os.environ if env is None else env
    raw = env.get("TF_CONFIG")
    if raw:
        cfg = json.loads(raw)
        workers = tuple(cfg.get("cluster", {}).get("worker", ()))
        task = cfg.get("task", {})
        if not workers or task.get("type", "worker") != "worker":
            raise ConfigError(f"TF_CONFIG must describe job 'worker' and this task as one of its "
                              f"tasks; got {raw!r}")
        if len(workers) < 2:
            return None
        return ClusterConfig(workers, int(task.get("index", 0)))
    size = int(env.get("WORLD_SIZE", "1"))
    if size < 2:
        return None
    local_size = int(env.get("LOCAL_WORLD_SIZE", str(size)))
    if local_size != size:
        raise ConfigError(f"WORLD_SIZE={size} spans several hosts (LOCAL_WORLD_SIZE="
                          f"{local_size}); give every process a TF_CONFIG with the workers' "
                          "addresses")
    addr, port = env.get("MASTER_ADDR", "localhost"), int(env.get("MASTER_PORT", "29500"))
    rank = int(env.get("RANK", "0"))
    return ClusterConfig(tuple(f"{addr}:{port + 1 + k}" for k in range(size)), rank,
                         int(env.get("LOCAL_RANK", str(rank))), local_size)


def _worker(k: int) -> str:
    return f"/job:worker/replica:0/task:{k}"


class TFCluster:
    """This process's part of the cluster: its server, the driver's connection, the mailboxes.

    Args:
        config: The cluster.
        timeout_s: The longest a receive waits (``MP_TF_TIMEOUT_S``, default 600 s).

    Example:
        >>> TFCluster(cluster_from_env())  # doctest: +SKIP
    """

    def __init__(self, config: ClusterConfig, timeout_s: float | None = None) -> None:
        import tensorflow as tf

        self.config = config
        self.timeout_s = float(timeout_s if timeout_s is not None
                               else os.environ.get("MP_TF_TIMEOUT_S", "600"))
        spec = tf.train.ClusterSpec({"worker": list(config.workers)})
        self.server = tf.distribute.Server(spec, job_name="worker", task_index=config.rank,
                                           start=True)
        if config.rank == 0:
            tf.config.experimental_connect_to_cluster(spec)
        self._sessions: dict[int, Any] = {}
        self._session_lock = threading.Lock()
        self._lock = threading.Lock()
        self._kept: dict[tuple[int, str], deque[Any]] = defaultdict(deque)

    @property
    def rank(self) -> int:
        """This process's rank."""
        return self.config.rank

    @property
    def size(self) -> int:
        """The number of processes."""
        return self.config.size

    def stage_devices(self, partitions: int) -> list[str]:
        """The device of every stage: stage ``s`` on task ``s * W // p`` (its GPUs in order, else
        its CPU), so every process holds ``p / W`` stages.

        Raises:
            ConfigError: if ``p`` is not a multiple of the processes, or a task has too few
                devices for its stages.
        """
        import tensorflow as tf

        w = self.size
        if partitions % w:
            raise ConfigError(f"partitions ({partitions}) must be a multiple of the processes "
                              f"({w}): every process holds the same number of stages")
        per = partitions // w
        names = [d.name for d in tf.config.list_logical_devices()]
        out: list[str] = []
        for k in range(w):
            mine = [n for n in names if n.startswith(_worker(k) + "/")]
            gpus = [n for n in mine if "/device:GPU:" in n]
            cpus = [n for n in mine if "/device:CPU:" in n]
            pool = gpus if len(gpus) >= per else cpus
            if len(pool) < per:
                raise ConfigError(f"task {k} needs {per} devices for its stages but has "
                                  f"{len(gpus)} GPUs and {len(cpus)} CPU devices")
            out.extend(pool[:per])
        return out

    # -- the mailboxes --------------------------------------------------------------------------

    def _session(self, task: int) -> Any:
        """``(session, ops)`` for ``task``'s mailbox: a graph of its queue with an enqueue (and,
        for this task, a dequeue) and a session on this process's server that sees only this
        task and ``task`` (one seeing the whole cluster waits, without end, for every task to be
        up). Made in a thread so that a task that never comes up is a
        :class:`StepTimeoutError`, not a hang."""
        import tensorflow as tf

        with self._session_lock:
            if task in self._sessions:
                return self._sessions[task]
            graph = tf.Graph()
            with graph.as_default(), tf.device(f"{_worker(task)}/device:CPU:0"):
                queue = tf.queue.FIFOQueue(256, [tf.string], shapes=[[]],
                                           shared_name=f"mp_mailbox_{task}")
                payload = tf.compat.v1.placeholder(tf.string, [])
                ops = {"payload": payload, "enqueue": queue.enqueue([payload]),
                       "dequeue": queue.dequeue()}
            filters = sorted({_worker(self.rank), _worker(task)})
            config = tf.compat.v1.ConfigProto(device_filters=filters)
            made: list[Any] = []
            thread = threading.Thread(target=lambda: made.append((tf.compat.v1.Session(
                self.server.target, graph=graph, config=config), ops)), daemon=True)
            thread.start()
            thread.join(self.timeout_s)
            if not made:
                raise StepTimeoutError(
                    f"rank {self.rank} waited {self.timeout_s:.0f} s for rank {task}'s "
                    f"TensorFlow server at {self.config.workers[task]}; start every rank "
                    "(raise MP_TF_TIMEOUT_S for slow starts)")
            self._sessions[task] = made[0]
            return made[0]

    def _options(self) -> Any:
        import tensorflow as tf

        return tf.compat.v1.RunOptions(timeout_in_ms=int(self.timeout_s * 1000))

    def send(self, dest: int, tag: str, payload: Any) -> None:
        """Put ``payload`` (picklable) in rank ``dest``'s mailbox under ``tag``."""
        if not 0 <= dest < self.size:
            raise ConfigError(f"rank {dest} does not exist: the job has {self.size} processes")
        blob = pickle.dumps((self.rank, tag, payload), protocol=pickle.HIGHEST_PROTOCOL)
        import tensorflow as tf

        try:
            session, ops = self._session(dest)
            session.run(ops["enqueue"], {ops["payload"]: blob}, options=self._options())
        except tf.errors.DeadlineExceededError:
            raise StepTimeoutError(
                f"rank {self.rank} could not deliver {tag!r} to rank {dest} in "
                f"{self.timeout_s:.0f} s (its mailbox stayed full: it stopped receiving)"
            ) from None

    def recv(self, src: int, tag: str) -> Any:
        """The next payload rank ``src`` sent to this process under ``tag``.

        Raises:
            StepTimeoutError: after the timeout with nothing from ``src`` under ``tag``.
        """
        import tensorflow as tf

        key = (src, tag)
        with self._lock:
            while not self._kept[key]:
                try:
                    session, ops = self._session(self.rank)
                    blob = session.run(ops["dequeue"], options=self._options())
                except tf.errors.DeadlineExceededError:
                    raise StepTimeoutError(
                        f"rank {self.rank} waited {self.timeout_s:.0f} s for {tag!r} from rank "
                        f"{src}; that rank failed, exited or runs a different script (raise "
                        "MP_TF_TIMEOUT_S for longer steps)") from None
                source, got_tag, payload = pickle.loads(blob)
                self._kept[(source, got_tag)].append(payload)
            return self._kept[key].popleft()

    def send_to_followers(self, tag: str, payload: Any) -> None:
        """The driver's send of ``payload`` to every other rank."""
        for k in range(1, self.size):
            self.send(k, tag, payload)


_CLUSTER: TFCluster | None = None
_START = threading.Lock()


def start_cluster(config: ClusterConfig) -> TFCluster:
    """Start this process's part of ``config`` (once per process; TensorFlow cannot stop a
    server, so a second configuration is an error).

    Raises:
        ConfigError: if a different cluster was started before.

    Example:
        >>> start_cluster(cluster_from_env())  # doctest: +SKIP
    """
    global _CLUSTER
    with _START:
        if _CLUSTER is None:
            _CLUSTER = TFCluster(config)
        elif _CLUSTER.config != config:
            raise ConfigError(f"this process already serves cluster {_CLUSTER.config}; a "
                              "TensorFlow server cannot be restarted in another one")
        return _CLUSTER


def current_cluster() -> TFCluster | None:
    """The cluster this process serves, or None (one process).

    Example:
        >>> current_cluster() is None
        True
    """
    return _CLUSTER
