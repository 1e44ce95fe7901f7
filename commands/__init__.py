"""The command line's own code: options from configuration dataclasses, and the demo and CKA commands."""
