"""Integrations with other training stacks.

- `stableblocks.integrations.hf`: patch a transformers GPT-2 in place (`patch_gpt2`, `unpatch_gpt2`,
  `load_patched`, `param_groups`); needs the `hf` extra.
  `from_hf` / `to_hf` convert between an HF GPT-2 and a StableGPT.
- `stableblocks.integrations.nanogpt`: nanoGPT checkpoints to and from StableGPT (`from_nanogpt`,
  `to_nanogpt`).
- `stableblocks.integrations.gpt2_state`: GPT-2 state dicts in nanoGPT's names and layout, which both
  adapters share (`load_gpt2_state_dict`, `gpt2_state_dict`, `stable_name`, `gpt2_name`).

The adapters depend on the model; the model never imports them.
"""
