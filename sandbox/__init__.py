"""Sample PII API and sandbox providers for the demo, tests and benchmarks; never imported by a service."""
