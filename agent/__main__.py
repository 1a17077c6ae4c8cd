"""`python -m agent` is `bpfprof`."""

from agent.cli import main

main()
