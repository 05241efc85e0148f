"""The dispatcher service: resolves, renders and sends campaign messages, then forgets the contacts."""
