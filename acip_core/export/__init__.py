"""A chosen size (or every size) written as a folder transformers loads, and pushed to the hub."""
