"""Task decorators: ``@task.singleton``."""
