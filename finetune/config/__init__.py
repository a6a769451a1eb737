"""The config: the typed schema, where the YAML lives and what its presets give, the recipe a config
applies, and the parsing of `key=value` overrides."""
