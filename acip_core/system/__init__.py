"""The host's rules that every layer obeys: public mode's limits, disk bounds, the version."""
