"""Serving-time pieces (adapter sessions); see issue 4."""
