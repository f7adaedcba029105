#!/usr/bin/env python3
"""Writes docs/job-spec.md from the spec dataclasses (tests fail when the doc falls behind).

    .venv/bin/python scripts/gen-job-spec-doc.py
"""
from pathlib import Path

from distrain.spec import reference

HEADER = """# Job spec reference

A job is one YAML file (read with `yaml.safe_load`). Every key is optional; the defaults below
apply. `distrain validate JOB.yaml` prints the resolved job; `--set key.path=value` overrides any
key on the command line (the value is read as YAML: `--set train.epochs=3`,
`--set data.image_size=[96,96]`). An unknown key, a wrong type, an out-of-range value, a missing
directory or an unknown model or data source stops the command with one line and exit code 2:

    jobs/x.yaml: train.epochs: expected a positive integer, got "ten"

The resolved job is saved as `job.yaml` in the run dir; `distrain train --resume RUN_DIR` reads it.
Model parameters (`model.params`) are the keyword parameters of the model's builder: see
`distrain models` and `distrain/models.py`. The `sweep.*` keys describe many trainings of the job,
each with other values of some keys (`distrain sweep`): [sweeps.md](sweeps.md).

| key | default | meaning |
| --- | --- | --- |
"""

rows = [f"| `{key}` | `{default}` | {doc} |" for key, default, doc in reference()]
out = Path(__file__).resolve().parents[1] / "docs" / "job-spec.md"
out.write_text(HEADER + "\n".join(rows) + "\n")
print(f"wrote {out}")
