"""The commands of `retinanet`, one module each: the job (callable from Python) beside the handler that the command
line calls (`main(args)`: options in, the job, its summary printed). retinanet.cli holds the parser and imports a
command's module only when it runs, so that `--help` answers at once."""
