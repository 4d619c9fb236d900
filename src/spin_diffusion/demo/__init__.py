"""The built-in CPU demo: a procedural shapes world (`world`) and the end-to-end demo runner."""
