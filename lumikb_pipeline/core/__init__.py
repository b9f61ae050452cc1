"""The bottom layer: settings (one `Settings`), errors, secret scrubbing and shared names. Imports nothing
of the package."""
