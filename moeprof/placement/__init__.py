"""Expert placement and request grouping: topology, policy registry, grouping, simulator, exporters."""
