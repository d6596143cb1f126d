"""The project's Hydra sweeper, a plugin: Hydra loads plugins from the `hydra_plugins` package."""
