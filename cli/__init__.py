"""The `tokensend` command line: runs the services and the sandbox, and talks to a running suite.

It sits on top of everything else: it may import the services and the sandbox,
and nothing imports it.
"""
