"""The provider's Airflow plugin: the "Singleton locks" admin page and its API (``plugins.locks``)."""
