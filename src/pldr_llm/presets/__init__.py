"""Built-in training presets (YAML files read by ``pldr-llm train --preset NAME``)."""
