"""Serving: admission, scheduling, the engine thread, sampling, detokenization, sessions and the response cache."""
