"""The stages: each module here is a command (`python -m pipelines.<stage>`, `drc <stage>`);
the machinery they share lives in `pipelines.lib`."""
