"""`python -m infermeter` runs the same CLI as the `infermeter` console script."""

from infermeter.cli import main

raise SystemExit(main())
