"""The `kvd` command's exit codes, one meaning each across the subcommands (README and docs/operations.md have the
table; `kvd --help` prints EXIT_CODES). Probes only care about zero / non-zero; humans, scripts and systemd's
RestartPreventExitStatus= about why."""

EXIT_OK = 0
EXIT_SERVING = EXIT_OK
EXIT_NOT_SERVING = 1  # the daemon answered, but it is not SERVING (starting, draining, unknown service) or erred
EXIT_UNREACHABLE = 2  # no socket, nobody listening, or no answer in time
EXIT_FAILURE = 3  # serve could not start or stopped on an error (memory, a port in use, a live socket...)
EXIT_USAGE = 64  # a bad flag, value or configuration file (sysexits' EX_USAGE): retrying the same command won't help
EXIT_INTERRUPTED = 130  # a second SIGINT/SIGTERM while draining: stopped without finishing the drain

EXIT_CODES = f"""exit codes:
  {EXIT_OK:<4} success (health: SERVING)
  {EXIT_NOT_SERVING:<4} the daemon answered, but is not SERVING or answered with an error
  {EXIT_UNREACHABLE:<4} unreachable: no socket, nobody listening, or no answer in time
  {EXIT_FAILURE:<4} serve could not start, or stopped on an error
  {EXIT_USAGE:<4} a bad flag, value or configuration file
  {EXIT_INTERRUPTED:<4} serve stopped by a second signal without finishing its drain"""
