"""Hooks: SingletonHook and one connection type per lock store."""
