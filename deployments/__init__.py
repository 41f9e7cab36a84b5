"""The faces of gridserve: Ray Serve app, batch job, CLI and the bundled demo model."""
