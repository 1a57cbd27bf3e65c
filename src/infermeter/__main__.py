"""`python -m infermeter` runs the same CLI as the `infermeter` console script."""

from infermeter.cli import main
from infermeter.launch import run_entry

# run_entry: under torchrun, end this rank's process group with a bounded wait (launch.py).
raise SystemExit(run_entry(main))
