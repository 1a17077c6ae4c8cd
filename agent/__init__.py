"""The bpfprof process: CLI, probe loading, sessions, process tracking.

Only this package imports bcc.
"""
