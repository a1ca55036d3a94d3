"""One module per ``mone-jax`` command, each with ``run(args)``; :mod:`mone_jax.app.arguments` maps the command
names to them. Heavy imports (JAX, transformers) wait inside ``run``, so that ``--help`` stays light."""
