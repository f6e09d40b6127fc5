"""Integrations with other training stacks.

- `stableblocks.integrations.hf`: patch a transformers GPT-2 in place (`patch_gpt2`, `unpatch_gpt2`,
  `load_patched`, `param_groups`); needs the `hf` extra.
- `stableblocks.integrations.nanogpt`: nanoGPT checkpoints to and from StableGPT (`from_nanogpt`,
  `to_nanogpt`), also reachable as `StableGPT.from_nanogpt` / `StableGPT.to_nanogpt`.
"""
