"""CPython frames in profiles: interpreter layouts, the `py_procs` registry, code objects -> frames."""
