"""`bpfprof serve`: an OTLP receiver for traces and profiles, a SQLite store and a web UI.

From a slow span to the flame graph of what ran during it. Imports only
`exporters` (the Profile model, the OTLP decoder, the pprof encoder); nothing
imports this package but the CLI's `serve` command.
"""
