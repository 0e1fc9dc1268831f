"""Discrete-event simulation of a day of entity mutations for 10 to 100,000 tenants.

The event-driven design is simulated with the real domain code (`RefreshService`, `Debouncer`,
`InMemoryDebounceStore`) on a simulated clock; the alternatives (Cube's refresh worker, the seed's
in-memory debounce) are models fed with the same workload. docs/scale.md says which is which.
Run `make scale` (or `python -m bench.sim.report`)."""
