"""Triggers: an observe-only trigger that reports when a lock is free; it never acquires."""
