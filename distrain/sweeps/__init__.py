"""Sweeps: many trainings of one job, each with one set of overrides, compared (docs/sweeps.md).

- ``trials``: the ``sweep:`` section expanded into the trials' overrides (pure functions).
- ``plan``: a job's sweep, every trial validated as ``--set`` validates, before any starts.
- ``state``: ``SWEEP_DIR/sweep.yaml``, the trials' states and results.
- ``local``: ``distrain sweep``, the trials one after another in this process.
- ``launched``: a trial a launcher trains elsewhere (a SLURM array task, a Ray Tune trial), begun
  and ended in ``sweep.yaml``.
- ``compare``: the trials ranked on the sweep's metric, and their hparams for TensorBoard.

The package is ``sweeps``, not ``sweep``: ``distrain.sweep`` is the Python API's function
(``distrain.api.sweep``), which a sub-package of that name would hide.
"""
