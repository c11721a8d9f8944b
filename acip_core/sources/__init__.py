"""Where models and text come from: the base model loader (embedded GGUF, folders, hub ids, any
.gguf) and the calibration / evaluation text."""
