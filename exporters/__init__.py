"""The neutral Profile model, its encoders (pprof, OTLP, folded; by name in formats.py), the readers
back into it (pprof_reader, otlp.decode_otlp) and the OTLP sender (gRPC / HTTP).

Encoders are pure functions `encode_x(profile) -> bytes`: no I/O, no config; only otlp_sender does I/O.
"""
