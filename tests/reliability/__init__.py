"""Reliability suite: the real daemon under kills, restarts, stalls, floods and fuzzing."""
