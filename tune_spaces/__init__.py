"""The shipped search spaces (YAML), found by pipelines.lib.search_space.resolve wherever `drc tune` runs."""
