"""The built-in calibration methods, one module each (each defines METHOD; calib/registry.py
registers them). Modules whose name starts with an underscore hold what several methods share."""
