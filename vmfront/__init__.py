"""vmfront command line: one `vmfront` program whose subcommands start or talk to the per-VM processes."""
