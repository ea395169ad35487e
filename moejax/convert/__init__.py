"""Hugging Face checkpoints in and out of moejax: `python -m moejax.convert import|export|logits`.

    python -m moejax.convert import --hf=DIR --workdir=W      # config.json + safetensors -> W (step 0)
    python -m moejax.convert export --workdir=W --hf=DIR [--step=N]
    python -m moejax.convert logits --workdir=W --input_ids=ids.npy --out=logits.npy

Families: DeepSeek-V2/V3 (MLA, group-limited routing, YaRN), Qwen3-MoE, Qwen2-MoE, OLMoE, Mixtral,
with dense layers in any pattern (moejax/convert/hf_config.py); a run trained from scratch exports
as DeepSeek-V3; tensor names and layouts in moejax/convert/weights.py.
"""
