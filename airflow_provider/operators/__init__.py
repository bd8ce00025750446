"""Operators: SingletonOperator (run under the lock, or guard a group) and its release task."""
