"""The feddiff command line."""
