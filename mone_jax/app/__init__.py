"""The application layer: the CLI, its typed jobs and pipelines."""
