"""One module per `bpfprof` subcommand: parse options, build config, call the library."""
