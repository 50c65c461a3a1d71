"""Package data: sample text, calibration mix."""
