"""Built-in training recipes, one TOML file each; see :mod:`tandem.config`."""
