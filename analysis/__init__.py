"""Reports over sweep results (not built yet: see the project's issue on analysis/)."""
