"""The shipped search spaces (YAML), found by pipelines.search_space.resolve wherever `drc tune` runs."""
