"""preagg-refresh: keeps Cube pre-aggregations fresh when business entities change."""
