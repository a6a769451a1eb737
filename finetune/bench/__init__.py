"""The transfer benchmark's logic, which scripts/bench_*.py and scripts/plain_*.py drive from the command
line: runs and their results, the ImageFolders they train on, tables and plots, the five regimes and the
record of their runs in docs/regimes/."""
