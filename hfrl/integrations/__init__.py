"""Integrations with other frameworks, each an optional extra imported on first use.

- ``hfrl.integrations.megatron`` (``pip install hfrl[megatron]``): run hfrl's RL inside a running
  megatron-core job, on its process groups and its GPT model's weights, and hand the trained
  weights back (``train``); the group adoption and the weight conversion are usable on their own.
"""
