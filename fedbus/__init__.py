"""fedbus command line."""
