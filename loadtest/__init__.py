"""Multi-tenant load testing of OpenAI-compatible servers, and the reports of the merged-versus-unmerged profiler.

config (one validated LoadTestConfig) -> workload (arrivals, adapters, lengths; seeded) -> runner (Poisson or
closed loop over httpx, bounded) -> client (one streamed request, timed) -> stats (percentiles, throughput,
goodput) -> report (results.json, results.schema.json, summary.md) and plots (PNG). upload generates and uploads
adapters; compare puts several runs side by side; peer and profile_report serve `switchboard profile`.
This package talks to servers over HTTP only and never imports `switchboard.serving`.
"""
