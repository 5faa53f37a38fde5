"""GRPO (group relative policy optimisation) on verifiable answers: the ``recipe: grpo`` of train.py.

For each prompt the engine samples G completions from one shared prefix (the song encoded once,
its prefix KV computed once and copied into G decode slots); reward functions score them; the
policy is updated with TRL's clipped GRPO loss. Modules:

- :mod:`.config`: the ``grpo:`` section of a training config, validated;
- :mod:`.loss`: group-normalised advantages and the per-token loss (TRL 1.16.0's formula);
- :mod:`.rewards`: the built-in rewards and resolution of custom ones by import path;
- :mod:`.rollout`: prompts, the engine's G samples per prompt, and the teacher-forced batch;
- :mod:`.trainer`: the jitted update, the reference model, checkpoints and the loop.
"""
