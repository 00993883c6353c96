"""``python -m fastflow``: the command line, as ``torchrun -m fastflow train ...`` launches it."""

from fastflow.apps.cli import app

app(prog_name="fastflow")
