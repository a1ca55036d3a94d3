"""The application layer: the CLI (main, arguments, one module per command), its typed jobs and pipelines."""
