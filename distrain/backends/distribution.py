"""The backend interface: what a run asks of tf.distribute or Horovod, whichever is underneath.

``Distribution`` is the base; ``tensorflow.TFDistribution`` (one_device, mirrored, multi_worker)
and ``horovod.HorovodDistribution`` implement it, each constructed complete by its own module's
``build``, which ``factory.build`` calls. The run talks only to these methods, so it never asks
which backend it has.

Module layout (no import cycles): this module imports neither backend; each backend imports it;
``factory`` imports ``tensorflow`` and, inside ``factory.build``, ``horovod``.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

from distrain.world import World


class Distribution:
    """What the run needs from a backend.

    Attributes:
        name: one_device | mirrored | multi_worker | horovod.
        strategy: the ``tf.distribute.Strategy`` whose scope holds the model (TensorFlow's
            default strategy for one device and under Horovod).
        world: this process's place in the job.
        replicas: replicas in sync across the whole job (the global batch is per-replica × this).
        local_replicas: replicas in this process.
    """

    def __init__(self, name: str, strategy: Any, world: World, *, replicas: int, local_replicas: int):
        self.name = name
        self.strategy = strategy
        self.world = world
        self.replicas = replicas
        self.local_replicas = local_replicas

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name}, {self.replicas} replicas, "
                f"{self.local_replicas} local, rank {self.world.rank}/{self.world.world_size})")

    # -- input -----------------------------------------------------------------------------

    @property
    def num_pipelines(self) -> int:
        """Input pipelines over the job: one per worker process."""
        return self.world.world_size

    @property
    def pipeline_id(self) -> int:
        """This process's input pipeline."""
        return self.world.rank

    def distribute_datasets(self, dataset_fn: Callable[[Any], Any], *, even: bool = False) -> Any:
        """This process's input from ``dataset_fn(input_context)``, which returns per-replica
        batches and shards by the context itself (TensorFlow's auto-sharding is never involved).

        ``even``: every worker's pipeline has a batch for every step it will be asked for
        (training: distrain's pipelines yield exactly the run's steps, a user's repeat), so no
        step needs to check whether some worker has run out (evaluation's last step may).
        """
        raise NotImplementedError

    # -- model -----------------------------------------------------------------------------

    def scope(self):
        """The context in which the model and optimizer are created."""
        return self.strategy.scope()

    def wrap_optimizer(self, optimizer):
        """The optimizer as this backend needs it (Horovod wraps it for allreduce)."""
        return optimizer

    def reduce_gradients(self, gradients: list) -> list:
        """Gradients of this replica, made ready for ``optimizer.apply_gradients`` (accumulation).

        tf.distribute's optimizers sum the replicas' gradients inside ``apply_gradients``, so
        here they pass through; Horovod averages them over the ranks first.
        """
        return gradients

    def broadcast_initial_state(self, model, optimizer) -> None:
        """Makes every worker start from rank 0's weights and optimizer state
        (tf.distribute does this itself when variables are created)."""

    def adapt_model(self, model) -> None:
        """Backend changes to the compiled model, after accumulation's (none by default)."""

    def callbacks(self, state, steps_per_epoch: int, log_every: int) -> list:
        """Backend callbacks that run early in the list: after ``callbacks.RunMetrics`` (and the
        input watch), before anything that reads the logs (``callbacks`` module docstring).

        Args:
            state: the run's ``callbacks.RunState``.
            steps_per_epoch: optimizer steps per epoch.
            log_every: the steps at which TensorBoard logs step scalars (0: none).
        """
        return []

    def evaluation_callbacks(self) -> list:
        """Backend callbacks for the final ``evaluate``."""
        return []

    def collective_deadline(self):
        """A context in which a worker that waits for its peers too long fails (exit 76);
        ``distribute.collective_timeout_s`` where the backend enforces it."""
        return contextlib.nullcontext()

    def average_metrics(self, model, metrics: dict, local_examples: int) -> dict:
        """Evaluation metrics over all workers (a collective where the backend needs one).

        Args:
            model: the model that produced ``metrics`` (its metric accumulators are exact).
            metrics: this process's ``model.evaluate(..., return_dict=True)``.
            local_examples: examples this process evaluated.
        """
        return metrics

    # -- agreement -------------------------------------------------------------------------

    def sum(self, values: Sequence[float]) -> list[float]:
        """``values`` summed element-wise over all replicas of all workers (a collective)."""
        raise NotImplementedError

    def agree(self, flags: Sequence[bool]) -> list[bool]:
        """Each flag becomes true on every worker when it is true on any (a collective: all call it)."""
        if self.world.world_size == 1:
            return [bool(f) for f in flags]
        return [v > 0 for v in self.sum([1.0 if f else 0.0 for f in flags])]

    def peer_lost(self, err: Exception) -> bool:
        """Whether an error raised while training means another worker is gone.

        A collective whose peer died fails as unavailable/aborted/cancelled, or is aborted by
        the ``collective_deadline`` (``watchdog.Watchdog``).
        """
        import tensorflow as tf

        return self.world.world_size > 1 and isinstance(err, (
            tf.errors.DeadlineExceededError, tf.errors.UnavailableError, tf.errors.AbortedError,
            tf.errors.CancelledError))
