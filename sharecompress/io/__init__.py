"""Reading: adapters in every supported layout (PEFT, kohya, diffusers, Hub cache), strict
safetensors and JSON parsing, and confined file access that never follows a link."""
