"""The neutral Profile model and its encoders: pprof, folded (OTLP later).

Encoders are pure functions `encode_x(profile) -> bytes`: no I/O, no config.
"""
