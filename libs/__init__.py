"""Code shared by every tokensend service: settings, server bootstrap, errors, redaction, crypto, store."""
