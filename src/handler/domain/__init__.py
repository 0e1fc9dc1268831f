"""The domain: pure Python rules. Imports no AWS SDK and no HTTP client."""
