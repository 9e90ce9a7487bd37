"""The training service's server: settings, app, servicer, session store, error map and torch engine."""
