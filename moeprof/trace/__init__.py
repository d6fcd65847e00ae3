"""Trace format v1: schema, writer, reader. Depends on nothing else in moeprof."""

from moeprof.trace.manifest import Manifest, ModelInfo, Shard
from moeprof.trace.reader import Trace
from moeprof.trace.schema import FORMAT_VERSION, routing_schema
from moeprof.trace.writer import TraceWriter, routing_table

__all__ = ["FORMAT_VERSION", "Manifest", "ModelInfo", "Shard", "Trace", "TraceWriter", "routing_schema", "routing_table"]
