"""Adapters at the edges: boto3, httpx and in-memory implementations of the domain's ports."""
