"""The resolver service: turns anonymous IDs into contacts through a brand's PII API."""
