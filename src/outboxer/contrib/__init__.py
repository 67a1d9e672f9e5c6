"""Integrations with frameworks, each an optional package at the edges
(:mod:`outboxer.contrib.django`)."""
