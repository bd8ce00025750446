"""Sensors: SingletonSensor waits until a lock is free."""
