"""``python -m ssl4ecg`` is the same CLI as ``ssl4ecg``."""

from ssl4ecg.cli import main

main()
